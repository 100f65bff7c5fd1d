//! Bounds on a pipeline file before it is parsed into types: its size, and how much it expands
//! to through YAML aliases (a "billion laughs" file of a few kilobytes names billions of values).
//! Nesting depth is bounded by the YAML deserializer itself (128 levels).

use serde::de::{DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// The largest pipeline file read, in bytes.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;
/// The most values (scalars, lists and maps, aliases counted each time they are used) a pipeline
/// may expand to.
pub(crate) const MAX_VALUES: usize = 100_000;
/// The most bytes of text its scalars may expand to.
pub(crate) const MAX_TEXT_BYTES: usize = 8 << 20;

/// Walks the document as the deserializer will (every alias expanded where it is used), stopping
/// with an error as soon as it passes [`MAX_VALUES`] values or [`MAX_TEXT_BYTES`] of text.
pub(crate) fn check(text: &str) -> Result<(), serde_yaml_ng::Error> {
    let budget = Budget {
        values: Cell::new(MAX_VALUES),
        bytes: Cell::new(MAX_TEXT_BYTES),
    };
    Counter(&budget).deserialize(serde_yaml_ng::Deserializer::from_str(text))
}

struct Budget {
    values: Cell<usize>,
    bytes: Cell<usize>,
}

impl Budget {
    fn charge<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let values = self.values.get().checked_sub(1);
        let bytes = self.bytes.get().checked_sub(bytes);
        match (values, bytes) {
            (Some(v), Some(b)) => {
                self.values.set(v);
                self.bytes.set(b);
                Ok(())
            }
            _ => Err(E::custom(format!(
                "the YAML expands to more than {MAX_VALUES} values or {} MB of text (aliases \
                 repeated inside aliases?); a pipeline is far smaller",
                MAX_TEXT_BYTES >> 20
            ))),
        }
    }
}

#[derive(Clone, Copy)]
struct Counter<'a>(&'a Budget);

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.0.charge(v.len())
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.0.charge(v.len())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.charge(0)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.0.charge(0)?;
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.0.charge(0)?;
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.charge(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.charge(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag, then the value it tags.
        self.0.charge(0)?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_alias_bomb_is_stopped_by_the_budget_and_a_pipeline_passes() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let e = super::check(&bomb).unwrap_err().to_string();
        assert!(e.contains("more than 100000 values"), "{e}");
        let ok = "name: p\nsteps: [{classify: {top: 2}}]\nx: &x [1, 2]\ny: *x\n";
        super::check(ok).unwrap();
        // serde_yaml_ng's own bound on nesting holds too.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(super::check(&deep).is_err());
    }
}
