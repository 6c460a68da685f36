//! Relay tokens: `RelayToken::decode_unverified` and `verify` on arbitrary bytes, and on tokens
//! genuinely signed by the control key with one byte changed (which must never verify).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::{Identity, Key32, RelayToken, TokenError};

fuzz_target!(|data: &[u8]| {
    let control = Identity::from_seed([7; 32]);
    let key = control.public();

    // Arbitrary bytes.
    if let Ok((token, signed_len)) = RelayToken::decode_unverified(data) {
        assert_eq!(
            signed_len + 64,
            data.len(),
            "decode_unverified misreports the signed length"
        );
        assert_eq!(
            &token.sign(&control)[..signed_len],
            &data[..signed_len],
            "the signed part is not canonical"
        );
    }
    let _ = RelayToken::verify(data, &key, 0);

    // A token built from the input, signed, then verified as is and with one byte changed.
    let Some((head, rest)) = data.split_first_chunk::<12>() else {
        return;
    };
    let expires_at = u64::from_be_bytes([
        head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
    ]);
    let now = u64::from(head[8]) << (head[9] % 64);
    let n = usize::from(head[10]) % 33;
    let parties: Vec<[u8; 8]> = (0..n)
        .map(|i| {
            let mut p = [0u8; 8];
            for (j, b) in p.iter_mut().enumerate() {
                *b = rest.get(i * 8 + j).copied().unwrap_or(i as u8);
            }
            p
        })
        .collect();
    let token = RelayToken {
        agent: Key32([head[11]; 32]),
        expires_at,
        parties,
    };
    let signed = token.sign(&control);
    let want = if expires_at > now {
        Ok(token)
    } else {
        Err(TokenError::Expired)
    };
    assert_eq!(RelayToken::verify(&signed, &key, now), want);

    let pos = rest.len() % signed.len();
    let flip = rest.first().copied().unwrap_or(1).max(1);
    let mut altered = signed.clone();
    altered[pos] ^= flip;
    assert!(
        RelayToken::verify(&altered, &key, 0).is_err(),
        "a token with byte {pos} changed still verifies"
    );
    assert!(
        RelayToken::verify(&signed, &Identity::from_seed([8; 32]).public(), 0).is_err(),
        "a token verifies under another control key"
    );
});
