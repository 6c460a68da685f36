//! Agent names unique among the agents that share a party, as Tailscale does with machine
//! names: a second "laptop" becomes "laptop-2", a third "laptop-3".

use std::collections::BTreeSet;

use rally_proto::control::MAX_NAME_LEN;

/// The name an agent gets when it asks for `wanted`, currently holds `current` (if any), and
/// the agents it shares a party with hold `taken`: `wanted` if free, else `current` if that is
/// `wanted` disambiguated and still free (a restart does not rename it), else `wanted-N` for the
/// smallest free N ≥ 2, with `wanted` shortened to fit [`MAX_NAME_LEN`].
pub fn pick(wanted: &str, current: Option<&str>, taken: &BTreeSet<String>) -> String {
    if !taken.contains(wanted) {
        return wanted.to_owned();
    }
    if let Some(cur) = current.filter(|c| is_variant_of(c, wanted) && !taken.contains(*c)) {
        return cur.to_owned();
    }
    // At most `taken.len() + 1` candidates are needed to find a free one.
    (2..)
        .map(|n| variant(wanted, n))
        .find(|c| !taken.contains(c))
        .unwrap_or_else(|| wanted.to_owned())
}

/// `wanted-n`, shortening `wanted` so the whole fits in [`MAX_NAME_LEN`] bytes (names are
/// ASCII, so any cut is on a character boundary).
fn variant(wanted: &str, n: u64) -> String {
    let suffix = format!("-{n}");
    let keep = wanted.len().min(MAX_NAME_LEN - suffix.len());
    format!("{}{suffix}", &wanted[..keep])
}

/// Whether `name` is `wanted` numbered by [`variant`] (N ≥ 2).
fn is_variant_of(name: &str, wanted: &str) -> bool {
    name.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .is_some_and(|n| n >= 2 && variant(wanted, n) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_free_name_is_kept() {
        assert_eq!(pick("laptop", None, &set(&["desktop"])), "laptop");
        assert_eq!(pick("laptop", Some("laptop-2"), &set(&[])), "laptop");
    }

    #[test]
    fn a_taken_name_gets_the_smallest_free_number() {
        assert_eq!(pick("laptop", None, &set(&["laptop"])), "laptop-2");
        assert_eq!(
            pick("laptop", None, &set(&["laptop", "laptop-2", "laptop-4"])),
            "laptop-3"
        );
    }

    #[test]
    fn a_disambiguated_name_survives_a_restart() {
        let taken = set(&["laptop", "laptop-2"]);
        assert_eq!(pick("laptop", Some("laptop-3"), &taken), "laptop-3");
        // Not a variant of what it asks for now: numbered afresh.
        assert_eq!(pick("laptop", Some("phone-3"), &taken), "laptop-3");
        assert_eq!(pick("laptop", Some("laptop-2"), &taken), "laptop-3");
    }

    #[test]
    fn a_long_name_is_shortened_to_fit_its_number() {
        let long = "a".repeat(MAX_NAME_LEN);
        let got = pick(&long, None, &set(&[&long]));
        assert_eq!(got.len(), MAX_NAME_LEN);
        assert!(got.ends_with("-2"));
        assert_eq!(pick(&long, Some(&got), &set(&[&long])), got);
        rally_proto::control::validate_name(&got).unwrap();
    }
}
