//! A column of queued text values, kept encoded as the element part of a
//! binary `text[]` parameter.
//!
//! The pipeline queues thousands of rows per statement, one array per
//! column. As `Vec<Option<String>>` every value was copied into a `String`
//! of its own (an allocation and a free per value: with `memmove`, about
//! two fifths of the main daemon's CPU in a catch-up of small sales), then
//! copied again into the statement's message. A [`TextColumn`] appends each
//! value's length and bytes to one buffer as it is queued, and writes the
//! array's header and that buffer when the statement is sent.
//!
//! # Correctness
//!
//! The bytes are exactly what `postgres-types` writes for a one-dimensional
//! `text[]` of the same values (binary array format: dimensions, null flag,
//! element type, length and lower bound, then each element as a length,
//! `-1` for NULL, and its bytes), which the tests compare.

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Values of one column, encoded as the elements of a binary `text[]`.
#[derive(Debug, Default, Clone)]
pub(super) struct TextColumn {
    elements: Vec<u8>,
    len: usize,
    has_null: bool,
}

impl TextColumn {
    /// Appends a value (`None`: SQL NULL).
    pub(super) fn push(&mut self, v: Option<&str>) {
        match v {
            None => {
                self.elements.extend_from_slice(&(-1i32).to_be_bytes());
                self.has_null = true;
            }
            Some(s) => {
                // A text value is far below 2 GiB (PostgreSQL's own limit is
                // 1 GB); a longer one fails the statement instead of wrapping.
                let n = i32::try_from(s.len()).unwrap_or(i32::MAX);
                self.elements.extend_from_slice(&n.to_be_bytes());
                self.elements.extend_from_slice(s.as_bytes());
            }
        }
        self.len += 1;
    }

    /// Values held.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl ToSql for TextColumn {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let len = i32::try_from(self.len).map_err(|_| "too many values for one array")?;
        if self.elements.len() > i32::MAX as usize {
            return Err("an array of more than 2 GiB".into());
        }
        out.put_i32(1);
        out.put_i32(i32::from(self.has_null));
        out.put_u32(Type::TEXT.oid());
        out.put_i32(len);
        out.put_i32(1);
        out.extend_from_slice(&self.elements);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded<T: ToSql>(v: &T) -> Vec<u8> {
        let mut out = BytesMut::new();
        v.to_sql(&Type::TEXT_ARRAY, &mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn a_column_encodes_exactly_as_a_vector_of_optional_strings() {
        let cases: Vec<Vec<Option<&str>>> = vec![
            vec![],
            vec![Some("")],
            vec![None],
            vec![Some("1"), None, Some("é\\\"{}, x"), Some(""), None],
            (0..1000).map(|i| if i % 7 == 0 { None } else { Some("line") }).collect(),
        ];
        for values in cases {
            let mut c = TextColumn::default();
            for v in &values {
                c.push(*v);
            }
            assert_eq!(c.len(), values.len());
            assert_eq!(encoded(&c), encoded(&values), "{values:?}");
        }
    }
}
