//! The JSON keys of the config structs, read from their serde derive (the names serde accepts,
//! `rename_all` applied): what the addon's `configFields()` gives the test that checks the
//! TypeScript interfaces (`MicroVmConfig`, `SandboxConfig`, ...) against Rust.

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// The keys a struct with `#[derive(Deserialize)]` accepts.
pub fn json_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The derive calls `deserialize_struct` with its field list first; the error that follows
    // is expected and dropped.
    let _ = T::deserialize(FieldNames { fields: &mut fields });
    fields
}

struct FieldNames<'a> {
    fields: &'a mut &'static [&'static str],
}

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names read")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.fields = fields;
        Err(Stop)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)] // only the derive reads it
    struct Sample {
        host_path: String,
        read_only: bool,
    }

    #[test]
    fn reads_the_camel_case_keys_serde_accepts() {
        assert_eq!(json_fields::<Sample>(), ["hostPath", "readOnly"]);
        let vm = json_fields::<super::super::MicroVmConfig>();
        assert!(vm.contains(&"numVcpus") && vm.contains(&"allowUnsupportedHost"), "{vm:?}");
    }
}
