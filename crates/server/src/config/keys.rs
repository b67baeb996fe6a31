//! Every key the config file accepts, read off the serde structs of
//! [`file`](super::file) themselves.
//!
//! [`all`] runs `FileConfig::deserialize` against a recording
//! deserializer: each struct hands it its field list (the same list
//! `deny_unknown_fields` checks against), it offers every field, and it
//! notes the dotted path of each value that is not a table. So a field added
//! to a `File*` struct shows up here with no list to maintain, and the
//! reference test (`tests/e2e/reference.rs`) fails until
//! `docs/configuration.md` documents it.
//!
//! Paths are dotted as in the reference: tables of names
//! (`[service.NAME]`) become `<name>`, arrays of tables
//! (`[[listener]]`) add no step: `service.<name>.instance.port`.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::de::value::{BorrowedStrDeserializer, Error, U64Deserializer};
use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde::Deserialize;

use super::file::FileConfig;

/// Every key of the config file, dotted, sorted.
pub fn all() -> Vec<String> {
    let keys = RefCell::new(BTreeSet::new());
    let walker = Walker {
        path: "",
        keys: &keys,
    };
    // Every value is offered, so this succeeds; were it to fail (a serde
    // type this walker does not know), the keys seen so far are returned and
    // the reference test reports the ones missing.
    let _ = FileConfig::deserialize(walker);
    keys.into_inner().into_iter().collect()
}

/// Deserializes a value at `path`, noting it when it is a leaf.
#[derive(Clone, Copy)]
struct Walker<'k, 'p> {
    path: &'p str,
    keys: &'k RefCell<BTreeSet<String>>,
}

/// A value offered to a struct or map visitor.
enum Offer {
    /// Walk this path.
    Walk(String),
    /// A span bound of `toml::Spanned`: no key.
    Zero,
}

/// Offers `entries` as a map, in order.
struct Entries<'k> {
    entries: std::vec::IntoIter<(&'static str, Offer)>,
    next: Option<Offer>,
    keys: &'k RefCell<BTreeSet<String>>,
}

/// Offers one element.
struct One<'k, 'p>(Option<Walker<'k, 'p>>);

// === impl Walker ===

impl<'k, 'p> Walker<'k, 'p> {
    fn child(&self, step: &str) -> String {
        if self.path.is_empty() {
            step.to_owned()
        } else {
            format!("{}.{step}", self.path)
        }
    }

    fn leaf(&self) {
        self.keys.borrow_mut().insert(self.path.to_owned());
    }
}

impl<'de, 'k, 'p> Deserializer<'de> for Walker<'k, 'p>
where
    'de: 'static,
{
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: a type the key walker does not know",
            self.path
        )))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.leaf();
        v.visit_bool(false)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.leaf();
        v.visit_i64(0)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.leaf();
        v.visit_u64(0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.leaf();
        v.visit_f64(0.0)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.leaf();
        v.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(One(Some(self)))
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_map(Entries {
            entries: vec![("<name>", Offer::Walk(self.child("<name>")))].into_iter(),
            next: None,
            keys: self.keys,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let entries: Vec<_> = fields
            .iter()
            .map(|&f| {
                // toml::Spanned is a struct of private fields: its bounds
                // are no keys, its value stands for the field itself.
                let offer = match (f.starts_with("$__"), f.ends_with("value")) {
                    (true, true) => Offer::Walk(self.path.to_owned()),
                    (true, false) => Offer::Zero,
                    (false, _) => Offer::Walk(self.child(f)),
                };
                (f, offer)
            })
            .collect();
        v.visit_map(Entries {
            entries: entries.into_iter(),
            next: None,
            keys: self.keys,
        })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u16 u32 u128 f32 char bytes byte_buf unit
        unit_struct newtype_struct tuple tuple_struct enum identifier ignored_any
    }
}

// === impl Entries / One ===

impl<'de, 'k> MapAccess<'de> for Entries<'k>
where
    'de: 'static,
{
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((name, offer)) = self.entries.next() else {
            return Ok(None);
        };
        self.next = Some(offer);
        seed.deserialize(BorrowedStrDeserializer::new(name))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.next.take() {
            Some(Offer::Walk(path)) => seed.deserialize(Walker {
                path: &path,
                keys: self.keys,
            }),
            Some(Offer::Zero) => {
                let zero: U64Deserializer<Error> = 0u64.into_deserializer();
                seed.deserialize(zero)
            }
            None => Err(de::Error::custom("value asked before its key")),
        }
    }
}

impl<'de, 'k, 'p> SeqAccess<'de> for One<'k, 'p>
where
    'de: 'static,
{
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.0.take() {
            Some(w) => seed.deserialize(w).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_table_and_field() {
        let keys = all();
        for want in [
            "drain_timeout",
            "admin.listen",
            "admin.metrics_auth",
            "listener.name",
            "listener.route.path_prefix",
            "service.<name>.strategy",
            "service.<name>.breaker.open_base",
            "service.<name>.health_check.expected_statuses",
            "service.<name>.instance.tags",
            "discovery.endpoints",
        ] {
            assert!(
                keys.iter().any(|k| k == want),
                "{want} missing from {keys:?}"
            );
        }
        assert!(
            !keys
                .iter()
                .any(|k| k.contains("$__") || k == "service.<name>.breaker"),
            "span fields and tables are no keys: {keys:?}"
        );
    }
}
