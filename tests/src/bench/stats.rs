//! Figures: several samples of one quantity, summarised as `median [min–max] unit`, with ratios
//! against baselines measured in the same run.

use serde::Serialize;

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The `q` quantile (0..=1) of `v` by nearest rank; `None` when empty.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// A ratio of one figure against a baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The baseline's name, e.g. `raw veth`.
    pub against: String,
    /// The median of the per-run ratios (or the ratio of the medians when runs do not pair).
    pub value: f64,
}

/// One measured quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Group (`throughput`, `latency`, …), for the tables.
    pub group: String,
    /// What was measured, e.g. `tcp 1 stream a→b`.
    pub metric: String,
    /// Who was measured, e.g. `rally (direct)`.
    pub subject: String,
    pub unit: String,
    /// One value per run.
    pub samples: Vec<f64>,
    pub ratios: Vec<Ratio>,
    /// Anything worth saying next to the figure (e.g. "2/3 runs converged").
    pub note: Option<String>,
}

impl Figure {
    pub fn new(group: &str, metric: &str, subject: &str, unit: &str, samples: Vec<f64>) -> Self {
        Figure {
            group: group.to_owned(),
            metric: metric.to_owned(),
            subject: subject.to_owned(),
            unit: unit.to_owned(),
            samples,
            ratios: Vec::new(),
            note: None,
        }
    }

    pub fn name(&self) -> String {
        format!("{} {}, {}", self.group, self.metric, self.subject)
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.samples)
    }

    pub fn min(&self) -> Option<f64> {
        self.samples
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .reduce(f64::min)
    }

    pub fn max(&self) -> Option<f64> {
        self.samples
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .reduce(f64::max)
    }

    /// Adds the ratio of this figure to `base` (named `against`): the median of the per-run
    /// ratios when both have a value for every run, else the ratio of the medians.
    pub fn ratio_to(&mut self, against: &str, base: &[f64]) {
        let paired = self.samples.len() == base.len()
            && self
                .samples
                .iter()
                .zip(base)
                .all(|(a, b)| a.is_finite() && b.is_finite() && *b != 0.0);
        let value = if paired {
            let per_run: Vec<f64> = self.samples.iter().zip(base).map(|(a, b)| a / b).collect();
            median(&per_run)
        } else {
            match (self.median(), median(base)) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            }
        };
        if let Some(value) = value {
            self.ratios.push(Ratio {
                against: against.to_owned(),
                value,
            });
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// `name: median [min–max] unit (ratio vs baseline, …)`.
    pub fn line(&self) -> String {
        let mut s = format!("{}: {}", self.name(), self.value_text());
        if !self.ratios.is_empty() || self.note.is_some() {
            s.push_str(&format!(" ({})", self.ratio_text()));
        }
        s
    }

    /// `median [min–max] unit`, or `no data`.
    pub fn value_text(&self) -> String {
        match (self.median(), self.min(), self.max()) {
            (Some(m), Some(lo), Some(hi)) => format!(
                "{} [{}–{}] {}",
                fmt_num(m),
                fmt_num(lo),
                fmt_num(hi),
                self.unit
            ),
            _ => "no data".to_owned(),
        }
    }

    /// `0.45× raw veth, 1.8× boringtun-cli; note`.
    pub fn ratio_text(&self) -> String {
        let mut parts: Vec<String> = self
            .ratios
            .iter()
            .map(|r| format!("{}× {}", fmt_ratio(r.value), r.against))
            .collect();
        if let Some(n) = &self.note {
            parts.push(n.clone());
        }
        parts.join(", ")
    }
}

/// Three significant digits, no exponent for ordinary magnitudes.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A markdown table of `figures`: one row each.
pub fn markdown(figures: &[Figure]) -> String {
    let mut t = String::from("| group | metric | subject | median [min–max] | ratios |\n");
    t.push_str("|---|---|---|---|---|\n");
    for f in figures {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            f.group,
            f.metric,
            f.subject,
            f.value_text(),
            f.ratio_text()
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
    }

    #[test]
    fn figure_lines_carry_median_range_and_ratios() {
        let mut f = Figure::new(
            "tcp",
            "1 stream",
            "rally",
            "Mbit/s",
            vec![900.0, 1000.0, 1100.0],
        );
        f.ratio_to("raw veth", &[2000.0, 2000.0, 2000.0]);
        f.ratio_to("boringtun-cli", &[500.0]);
        assert_eq!(
            f.line(),
            "tcp 1 stream, rally: 1000 [900.0–1100] Mbit/s (0.50× raw veth, 2.00× boringtun-cli)"
        );
    }
}
