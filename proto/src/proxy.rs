//! HTTP CONNECT proxies (`rally up --proxy`, `HTTPS_PROXY`) as pure functions: the proxy's
//! address from its URL, and whether its reply header lets the tunnel through. Only plain
//! `http://HOST:PORT` proxies without credentials.

/// The longest proxy reply header read before giving up.
pub const MAX_REPLY: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("the proxy's reply is not HTTP")]
    NotHttp,
    #[error("the proxy refused: {0}")]
    Refused(String),
    #[error("the proxy's reply header is over {MAX_REPLY} bytes")]
    TooLong,
}

/// `http://HOST:PORT[/]` or `HOST:PORT` → `HOST:PORT`.
pub fn parse_proxy(url: &str) -> Result<String, ProxyError> {
    let bad = || ProxyError::BadUrl(url.to_owned());
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains("://") || rest.contains('@') || rest.contains('/') {
        return Err(bad());
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Err(bad());
    }
    Ok(rest.to_owned())
}

/// Checks a complete reply header (up to and including the blank line): `Ok` for a 2xx.
pub fn check_reply(header: &[u8]) -> Result<(), ProxyError> {
    let text = std::str::from_utf8(header).map_err(|_| ProxyError::NotHttp)?;
    let status = text.lines().next().ok_or(ProxyError::NotHttp)?;
    let mut parts = status.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(ProxyError::NotHttp);
    }
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(ProxyError::Refused(status.chars().take(120).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        assert_eq!(parse_proxy("http://proxy:3128").unwrap(), "proxy:3128");
        assert_eq!(
            parse_proxy("http://10.0.0.1:8080/").unwrap(),
            "10.0.0.1:8080"
        );
        assert_eq!(parse_proxy("[::1]:3128").unwrap(), "[::1]:3128");
        for bad in [
            "https://proxy:3128",
            "http://user:pw@proxy:3128",
            "proxy",
            "http://proxy:0",
            "http://:80",
            "socks5://p:1",
        ] {
            assert!(parse_proxy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies() {
        assert_eq!(
            check_reply(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check_reply(b"HTTP/1.0 200\r\n\r\n"), Ok(()));
        assert!(matches!(
            check_reply(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            Err(ProxyError::Refused(s)) if s == "HTTP/1.1 403 Forbidden"
        ));
        assert_eq!(check_reply(b"SSH-2.0\r\n\r\n"), Err(ProxyError::NotHttp));
        assert_eq!(check_reply(b"\xff\xfe\r\n\r\n"), Err(ProxyError::NotHttp));
        assert_eq!(check_reply(b""), Err(ProxyError::NotHttp));
    }
}
