//! JSON objects read with Go `encoding/json` semantics, because upstream flanneld reads
//! the same JSON: object keys match field names case-insensitively (an exact key wins,
//! otherwise the first key equal ignoring ASCII case), unknown keys are ignored, and `null`
//! counts as absent. Used for net-conf, lease values and backend data alike.

use serde_json::{Map, Value};

use super::cidr::{Cidr, masked, parse_cidr};

/// A field of the wrong JSON type or with an unparsable value.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("field {field}: {value} is not {expected}")]
pub struct FieldError {
    /// Field name with its path (`Backend.VNI`).
    pub field: String,
    /// The JSON value found (truncated).
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

/// A JSON object looked up the way Go's `encoding/json` matches struct fields.
#[derive(Clone, Copy)]
pub struct GoObject<'a> {
    map: &'a Map<String, Value>,
    /// Field-name prefix for error messages (`"Backend."`).
    path: &'static str,
}

impl<'a> GoObject<'a> {
    /// Looks fields up in `map`, naming them `<path><name>` in errors.
    pub fn new(map: &'a Map<String, Value>, path: &'static str) -> Self {
        Self { map, path }
    }

    /// The value of field `name`, `None` when absent or `null`.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let found = self.map.get(name).or_else(|| {
            self.map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        });
        found.filter(|v| !v.is_null())
    }

    /// The error for field `name` holding `value` where `expected` was wanted.
    pub fn field_err(&self, name: &str, value: &Value, expected: &'static str) -> FieldError {
        let mut value = value.to_string();
        if value.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|i| value.is_char_boundary(*i))
                .unwrap_or(0);
            value = format!("{}… ({} bytes)", &value[..cut], value.len());
        }
        FieldError {
            field: format!("{}{name}", self.path),
            value,
            expected,
        }
    }

    /// A Go `bool` field.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, FieldError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.field_err(name, v, "a boolean")),
        }
    }

    /// A Go `uint`/`int` field: a JSON integer (no fraction, no exponent).
    pub fn int(&self, name: &str) -> Result<Option<i64>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.field_err(name, v, "an integer")),
        }
    }

    /// A Go `string` field.
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.field_err(name, v, "a string")),
        }
    }

    /// A string field parsed as `T` (an address, a MAC…).
    pub fn parsed<T: std::str::FromStr>(
        &self,
        name: &str,
        expected: &'static str,
    ) -> Result<Option<T>, FieldError> {
        let Some(s) = self.str(name)? else {
            return Ok(None);
        };
        s.parse()
            .map(Some)
            .map_err(|_| self.field_err(name, &Value::from(s), expected))
    }

    /// A CIDR field (`a.b.c.d/n`, the `/n` required), host bits masked off as Go's
    /// `net.ParseCIDR` does (`10.244.1.0/16` is `10.244.0.0/16`).
    pub fn cidr<N: Cidr>(
        &self,
        name: &str,
        expected: &'static str,
    ) -> Result<Option<N>, FieldError> {
        let Some(s) = self.str(name)? else {
            return Ok(None);
        };
        match parse_cidr::<N>(s) {
            Some(net) => Ok(Some(masked(net))),
            None => Err(self.field_err(name, &Value::from(s), expected)),
        }
    }
}
