//! `veil_keyed_hash`: a per-query keyed pseudo-random priority for rows.
//!
//! Contribution bounding keeps, per unit, the groups and rows with the smallest
//! priorities. Priorities are SipHash-1-3 under a fresh 128-bit key drawn for
//! each query (from opendp's CSPRNG), over the row's values in Arrow's row
//! encoding, so which rows survive is uniform and unpredictable, never "the
//! first rows". Identical rows get identical priorities, which cannot change
//! an aggregate. The function is not registered in any operator session; the
//! rewrite inserts it directly.

use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use siphasher::sip::SipHasher13;

/// The UDF; its key never appears in plans, logs or `Debug` output.
#[derive(PartialEq, Eq, Hash)]
pub struct KeyedHash {
    key: [u8; 16],
    signature: Signature,
}

impl fmt::Debug for KeyedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedHash { key: <redacted> }")
    }
}

impl KeyedHash {
    /// An expression hashing `args` under `key`.
    pub fn call(key: [u8; 16], args: Vec<Expr>) -> Expr {
        Self::udf(key).call(args)
    }

    /// The function hashing under `key`.
    pub(crate) fn udf(key: [u8; 16]) -> Arc<ScalarUDF> {
        Arc::new(ScalarUDF::new_from_impl(KeyedHash {
            key,
            signature: Signature::variadic_any(Volatility::Immutable),
        }))
    }

    /// The key (for the plan codec only).
    pub(crate) fn key(&self) -> [u8; 16] {
        self.key
    }

    fn hash_arrays(&self, arrays: &[ArrayRef]) -> Result<UInt64Array> {
        let fields = arrays
            .iter()
            .map(|a| SortField::new(a.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)?;
        let rows = converter.convert_columns(arrays)?;
        Ok(rows
            .iter()
            .map(|row| {
                let mut h = SipHasher13::new_with_key(&self.key);
                h.write(row.as_ref());
                h.finish()
            })
            .collect())
    }
}

impl ScalarUDFImpl for KeyedHash {
    fn name(&self) -> &str {
        "veil_keyed_hash"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        Ok(ColumnarValue::Array(Arc::new(self.hash_arrays(&arrays)?)))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};

    use super::*;

    fn h(key: [u8; 16]) -> KeyedHash {
        KeyedHash {
            key,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }

    #[test]
    fn equal_rows_hash_equal_and_keys_matter() {
        let a: ArrayRef = Arc::new(StringArray::from(vec!["朝阳区", "朝阳区", "海淀区"]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![1, 1, 1]));
        let x = h([1; 16])
            .hash_arrays(&[a.clone(), b.clone()])
            .expect("hash");
        let y = h([2; 16]).hash_arrays(&[a, b]).expect("hash");
        assert_eq!(x.value(0), x.value(1));
        assert_ne!(x.value(0), x.value(2));
        assert_ne!(x.value(0), y.value(0));
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", h([7; 16])).contains('7'));
    }
}
