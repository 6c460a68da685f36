//! The HTTP/1.1 that the `--metrics` endpoints speak, as pure functions: is a request head
//! complete, and what to answer it. Each daemon keeps only a small accept loop around these.

/// `Content-Type` of Prometheus text exposition (format 0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Longest request head read before answering anyway.
pub const MAX_HEAD: usize = 8 * 1024;

/// Whether `buf` holds a whole request head (or as much as will be read).
pub fn head_complete(buf: &[u8]) -> bool {
    buf.len() >= MAX_HEAD || buf.windows(4).any(|w| w == b"\r\n\r\n")
}

/// The response to a request head: `GET /metrics` gets `render()` (or 503 when it returns
/// `None`), another GET a 404, another method a 405. The connection is closed after it.
pub fn metrics_response(head: &[u8], render: impl FnOnce() -> Option<String>) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => match render() {
            Some(body) => ("200 OK", PROMETHEUS_TEXT, body),
            None => ("503 Service Unavailable", "text/plain", "stopping\n".into()),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Appends one metric in Prometheus text format: HELP and TYPE lines, then one sample per
/// `(labels, value)`; `labels` is `key="value",…` without braces, or empty.
pub fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(String, f64)],
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Escapes a label value (backslash, double quote, newline).
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn get_metrics_renders() {
        let r = text(metrics_response(b"GET /metrics HTTP/1.1\r\n\r\n", || {
            Some("x 1\n".into())
        }));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 4\r\n"));
        assert!(r.ends_with("\r\n\r\nx 1\n"));
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        assert!(
            text(metrics_response(b"GET / HTTP/1.1\r\n\r\n", || None)).starts_with("HTTP/1.1 404")
        );
        assert!(
            text(metrics_response(b"POST /metrics HTTP/1.1\r\n\r\n", || None))
                .starts_with("HTTP/1.1 405")
        );
        assert!(
            text(metrics_response(b"GET /metrics HTTP/1.1\r\n\r\n", || None))
                .starts_with("HTTP/1.1 503")
        );
    }

    #[test]
    fn head_is_complete_at_the_blank_line_or_the_limit() {
        assert!(!head_complete(b"GET /metrics HTTP/1.1\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.1\r\n\r\n"));
        assert!(head_complete(&vec![b'a'; MAX_HEAD]));
    }

    #[test]
    fn metrics_are_written_with_labels() {
        let mut out = String::new();
        write_metric(
            &mut out,
            "m",
            "gauge",
            "help",
            &[("a=\"b\"".into(), 2.0), (String::new(), 3.0)],
        );
        assert_eq!(out, "# HELP m help\n# TYPE m gauge\nm{a=\"b\"} 2\nm 3\n");
        assert_eq!(label_value("a\"b\\"), "a\\\"b\\\\");
    }

    proptest! {
        #[test]
        fn arbitrary_heads_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = head_complete(&b);
            let r = metrics_response(&b, || Some(String::new()));
            prop_assert!(r.starts_with(b"HTTP/1.1 "));
        }
    }
}
