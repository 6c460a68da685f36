//! `proxy::check_reply` on arbitrary reply headers and `proxy::parse_proxy` on arbitrary URLs:
//! never a panic; an accepted URL is a `HOST:PORT` with a non-zero port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::proxy::{check_reply, parse_proxy};

fuzz_target!(|data: &[u8]| {
    let _ = check_reply(data);
    let text = String::from_utf8_lossy(data);
    if let Ok(addr) = parse_proxy(&text) {
        let (host, port) = addr.rsplit_once(':').expect("an accepted proxy has a port");
        assert!(!host.is_empty());
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
    }
});
