//! Reading the two internally tagged enums that carry peers, [`ServerMsg`] and
//! [`PeerChange`], without serde's detour.
//!
//! serde's derive for an internally tagged enum first buffers the whole object into a
//! generic tree (to find the tag wherever it is), then reads the variant from that tree: a
//! peer map of a thousand peers is parsed twice and allocated twice. Every writer puts the
//! tag first (serde does), so when the first key is the tag these impls read the tag and then
//! the variant's fields straight from the input for `peer_map`, `peer_delta`, `upsert` and
//! `remove`. Any other message, or an object whose tag is not first, is collected as a
//! `serde_json::Value` and handed to the derived code: same result, same errors, the old
//! speed.

use serde::de::{Error, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::{PeerChange, PeerInfo, ServerMsg};
use crate::key::Key32;

impl Serialize for ServerMsg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ServerMsg::serialize(self, s)
    }
}

impl Serialize for PeerChange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PeerChange::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for ServerMsg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Tagged::<ServerMsg>::new())
    }
}

impl<'de> Deserialize<'de> for PeerChange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Tagged::<PeerChange>::new())
    }
}

/// An enum read by [`Tagged`].
trait FastTagged: Sized {
    const TAG: &'static str;
    const EXPECTING: &'static str;
    /// Reads the fields after the tag if this variant is read directly; `Err(map)` hands the
    /// untouched rest back.
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Result<Self, A::Error>, A>;
    /// The derived deserializer.
    fn derived(v: Value) -> Result<Self, serde_json::Error>;
}

impl FastTagged for ServerMsg {
    const TAG: &'static str = "type";
    const EXPECTING: &'static str = "a control-plane message (an object with a `type`)";

    fn fields<'de, A: MapAccess<'de>>(tag: &str, mut map: A) -> Result<Result<Self, A::Error>, A> {
        match tag {
            "peer_map" => Ok(two_fields(&mut map, "version", "peers")
                .map(|(version, peers)| ServerMsg::PeerMap { version, peers })),
            "peer_page" => Ok(two_fields(&mut map, "version", "peers")
                .map(|(version, peers)| ServerMsg::PeerPage { version, peers })),
            "peer_delta" => Ok(two_fields(&mut map, "version", "changes")
                .map(|(version, changes)| ServerMsg::PeerDelta { version, changes })),
            _ => Err(map),
        }
    }

    fn derived(v: Value) -> Result<Self, serde_json::Error> {
        ServerMsg::deserialize(v)
    }
}

impl FastTagged for PeerChange {
    const TAG: &'static str = "op";
    const EXPECTING: &'static str = "a peer change (an object with an `op`)";

    fn fields<'de, A: MapAccess<'de>>(tag: &str, mut map: A) -> Result<Result<Self, A::Error>, A> {
        match tag {
            "upsert" => {
                Ok(one_field::<PeerInfo, A>(&mut map, "peer")
                    .map(|peer| PeerChange::Upsert { peer }))
            }
            "remove" => Ok(one_field::<Key32, A>(&mut map, "peer_id")
                .map(|peer_id| PeerChange::Remove { peer_id })),
            _ => Err(map),
        }
    }

    fn derived(v: Value) -> Result<Self, serde_json::Error> {
        PeerChange::deserialize(v)
    }
}

struct Tagged<T>(std::marker::PhantomData<T>);

impl<T> Tagged<T> {
    fn new() -> Self {
        Tagged(std::marker::PhantomData)
    }
}

impl<'de, T: FastTagged> Visitor<'de> for Tagged<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut seen = Map::new();
        if let Some(key) = map.next_key::<String>()? {
            if key == T::TAG {
                let tag: String = map.next_value()?;
                match T::fields(&tag, map) {
                    Ok(read) => return read,
                    Err(rest) => map = rest,
                }
                seen.insert(key, Value::String(tag));
            } else {
                let value: Value = map.next_value()?;
                seen.insert(key, value);
            }
        }
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if seen.contains_key(&key) {
                return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
            }
            seen.insert(key, value);
        }
        T::derived(Value::Object(seen)).map_err(A::Error::custom)
    }
}

/// The fields `a` and `b` in either order; others are skipped (as the derive does).
fn two_fields<'de, A, X, Y>(
    map: &mut A,
    a: &'static str,
    b: &'static str,
) -> Result<(X, Y), A::Error>
where
    A: MapAccess<'de>,
    X: Deserialize<'de>,
    Y: Deserialize<'de>,
{
    let (mut x, mut y) = (None, None);
    while let Some(key) = map.next_key::<FieldName>()? {
        match key.0 {
            k if k == a => put(&mut x, map.next_value()?, a)?,
            k if k == b => put(&mut y, map.next_value()?, b)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok((
        x.ok_or_else(|| A::Error::missing_field(a))?,
        y.ok_or_else(|| A::Error::missing_field(b))?,
    ))
}

fn one_field<'de, X: Deserialize<'de>, A: MapAccess<'de>>(
    map: &mut A,
    a: &'static str,
) -> Result<X, A::Error> {
    let mut x = None;
    while let Some(key) = map.next_key::<FieldName>()? {
        if key.0 == a {
            put(&mut x, map.next_value()?, a)?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
    }
    x.ok_or_else(|| A::Error::missing_field(a))
}

fn put<T, E: Error>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), E> {
    if slot.replace(v).is_some() {
        return Err(E::duplicate_field(name));
    }
    Ok(())
}

/// A key, borrowed from the input when it can be (keys here never need unescaping).
struct FieldName(std::borrow::Cow<'static, str>);

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FieldName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<FieldName, E> {
                Ok(FieldName(match v {
                    "version" => "version".into(),
                    "peers" => "peers".into(),
                    "changes" => "changes".into(),
                    "peer" => "peer".into(),
                    "peer_id" => "peer_id".into(),
                    other => other.to_owned().into(),
                }))
            }
        }
        d.deserialize_identifier(V)
    }
}
