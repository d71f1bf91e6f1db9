//! `veil_clamp` and `veil_outside_bounds`: a bounded column's values as
//! fixed-point decimals clamped to its declared bounds, and 1 where a value
//! lies outside those bounds.
//!
//! Each is one pass over a batch, where the same in SQL is a chain of casts,
//! `isnan` and `CASE`s, each its own pass (the one pass made a bounded
//! 1M-row GROUP BY 4 to 10% faster). What they compute:
//! - floating-point values: NULL and NaN are no value (NULL). Any other value
//!   is clamped to the bounds as a float first, so that ±∞ and values beyond
//!   the decimal range are clamped like any other (not lost), then rounded to
//!   the column's precision as Arrow's cast rounds (half away from zero);
//! - any other type: `TRY_CAST(x AS DECIMAL(38, p))`, NULL where that fails
//!   (text that is no number, a value beyond 38 digits), then clamped.
//!
//! The result always lies within the fixed-point bounds. Neither function
//! can fail on any value, so no data-dependent error arises here. Both are
//! never registered in a session: the rewrite inserts them directly, and the
//! plan codec carries their bounds.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, Int64Array};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, DecimalType, Float64Type};
use datafusion::common::{Result, internal_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use serde::{Deserialize, Serialize};

use crate::rewrite::DECIMAL_PRECISION;

/// A column's declared bounds, as floats and in fixed-point units.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Bounds {
    /// Declared lower bound.
    pub lo: f64,
    /// Declared upper bound.
    pub hi: f64,
    /// Decimal digits kept.
    pub scale: i8,
    /// Lower bound in fixed-point units (`lo` rounded up).
    pub lo_fp: i128,
    /// Upper bound in fixed-point units (`hi` rounded down).
    pub hi_fp: i128,
}

impl PartialEq for Bounds {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Bounds {}

impl Hash for Bounds {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

/// What a function computes from the bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Clamp {
    /// The clamped fixed-point value (`veil_clamp`).
    Value,
    /// 1 where the value lies outside the bounds, else NULL
    /// (`veil_outside_bounds`): counted like a column's non-NULL values.
    Outside,
}

impl Bounds {
    /// Declared bounds kept to `scale` decimal digits: the fixed-point
    /// bounds round inwards, so they never admit a value outside `lo..=hi`.
    pub fn new(lo: f64, hi: f64, scale: i8) -> Bounds {
        let mul = 10f64.powi(i32::from(scale));
        Bounds {
            lo,
            hi,
            scale,
            lo_fp: (lo * mul).ceil() as i128,
            hi_fp: (hi * mul).floor() as i128,
        }
    }

    fn key(&self) -> (u64, u64, i8, i128, i128) {
        (
            self.lo.to_bits(),
            self.hi.to_bits(),
            self.scale,
            self.lo_fp,
            self.hi_fp,
        )
    }

    /// `veil_clamp(value)` or `veil_outside_bounds(value)`.
    pub fn call(self, clamp: Clamp, value: Expr) -> Expr {
        self.udf(clamp).call(vec![value])
    }

    /// The function behind [`Self::call`].
    pub(crate) fn udf(self, clamp: Clamp) -> Arc<ScalarUDF> {
        Arc::new(ScalarUDF::new_from_impl(ClampFn {
            bounds: self,
            clamp,
            signature: Signature::any(1, Volatility::Immutable),
        }))
    }

    fn decimal_type(&self) -> DataType {
        DataType::Decimal128(DECIMAL_PRECISION, self.scale)
    }

    /// `TRY_CAST(values AS DECIMAL(38, scale))`.
    fn try_decimal(&self, values: &ArrayRef) -> Result<ArrayRef> {
        let options = CastOptions {
            safe: true,
            ..Default::default()
        };
        Ok(cast_with_options(values, &self.decimal_type(), &options)?)
    }

    /// Keeps a fixed-point value within the bounds (never panics, unlike
    /// `clamp`, even if the bounds were reversed).
    fn within(&self, v: i128) -> i128 {
        v.max(self.lo_fp).min(self.hi_fp)
    }

    fn values(&self, values: &ArrayRef) -> Result<Decimal128Array> {
        let clamped = if values.data_type().is_floating() {
            let floats = cast_with_options(values, &DataType::Float64, &CastOptions::default())?;
            let mul = 10f64.powi(i32::from(self.scale));
            floats.as_primitive::<Float64Type>().unary_opt(|x| {
                if x.is_nan() {
                    return None;
                }
                // Saturates; a bound beyond 38 digits fails the check.
                let v = round_half_away(mul * x.max(self.lo).min(self.hi));
                Decimal128Type::is_valid_decimal_precision(v, DECIMAL_PRECISION)
                    .then(|| self.within(v))
            })
        } else {
            self.try_decimal(values)?
                .as_primitive::<Decimal128Type>()
                .unary(|v| self.within(v))
        };
        Ok(clamped.with_precision_and_scale(DECIMAL_PRECISION, self.scale)?)
    }

    fn outside(&self, values: &ArrayRef) -> Result<Int64Array> {
        let one = |outside: bool| outside.then_some(1i64);
        Ok(if values.data_type().is_floating() {
            let floats = cast_with_options(values, &DataType::Float64, &CastOptions::default())?;
            // NaN compares false both ways: no value, like NULL.
            floats
                .as_primitive::<Float64Type>()
                .unary_opt(|x| one(x < self.lo || x > self.hi))
        } else {
            self.try_decimal(values)?
                .as_primitive::<Decimal128Type>()
                .unary_opt(|v| one(v < self.lo_fp || v > self.hi_fp))
        })
    }
}

/// `y.round() as i128` (half away from zero, saturating), with integer
/// arithmetic where `y` fits an `i64`: `round` and the conversion to `i128`
/// are library calls, most of the cost of a clamp.
fn round_half_away(y: f64) -> i128 {
    if y.abs() < 9.0e18 {
        // Truncates towards zero. Below 2^52 the fraction is exact (Sterbenz);
        // above, `y` is an integer and the fraction is 0.
        let t = y as i64;
        let fraction = y - t as f64;
        i128::from(if fraction >= 0.5 {
            t + 1
        } else if fraction <= -0.5 {
            t - 1
        } else {
            t
        })
    } else {
        y.round() as i128
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ClampFn {
    bounds: Bounds,
    clamp: Clamp,
    signature: Signature,
}

/// The bounds and kind of a `veil_clamp` or `veil_outside_bounds` function
/// (for the plan codec).
pub(crate) fn clamp_of(f: &ScalarUDF) -> Option<(Bounds, Clamp)> {
    (f.inner().as_ref() as &dyn std::any::Any)
        .downcast_ref::<ClampFn>()
        .map(|c| (c.bounds, c.clamp))
}

impl ScalarUDFImpl for ClampFn {
    fn name(&self) -> &str {
        match self.clamp {
            Clamp::Value => "veil_clamp",
            Clamp::Outside => "veil_outside_bounds",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.clamp {
            Clamp::Value => self.bounds.decimal_type(),
            Clamp::Outside => DataType::Int64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [values] = arrays.as_slice() else {
            return internal_err!("{} takes one argument", self.name());
        };
        let out: ArrayRef = match self.clamp {
            Clamp::Value => Arc::new(self.bounds.values(values)?),
            Clamp::Outside => Arc::new(self.bounds.outside(values)?),
        };
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float32Array, Float64Array, Int64Array, StringArray};
    use proptest::prelude::*;

    use super::*;

    fn bounds(lo: f64, hi: f64, scale: i8) -> Bounds {
        Bounds::new(lo, hi, scale)
    }

    fn decimals(a: &Decimal128Array) -> Vec<Option<i128>> {
        a.iter().collect()
    }

    /// The obvious reference: clamp as floats, round with Arrow's own cast,
    /// clamp again in fixed point.
    fn reference(b: &Bounds, xs: &[Option<f64>]) -> Vec<Option<i128>> {
        let clamped: Float64Array = xs
            .iter()
            .map(|x| x.filter(|x| !x.is_nan()).map(|x| x.max(b.lo).min(b.hi)))
            .collect();
        let cast = b
            .try_decimal(&(Arc::new(clamped) as ArrayRef))
            .expect("cast");
        cast.as_primitive::<Decimal128Type>()
            .iter()
            .map(|v| v.map(|v| v.max(b.lo_fp).min(b.hi_fp)))
            .collect()
    }

    #[test]
    fn floats_are_clamped_rounded_and_nan_is_no_value() {
        let b = bounds(0.0, 40000.0, 2);
        let xs: ArrayRef = Arc::new(Float64Array::from(vec![
            Some(12.345),
            Some(-3.0),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
            Some(f64::NAN),
            None,
            Some(1e300),
            Some(-0.0),
            Some(40000.0),
        ]));
        assert_eq!(
            decimals(&b.values(&xs).expect("values")),
            [
                Some(1235),
                Some(0),
                Some(4_000_000),
                Some(0),
                None,
                None,
                Some(4_000_000),
                Some(0),
                Some(4_000_000)
            ]
        );
        let outside: Vec<_> = b.outside(&xs).expect("outside").iter().collect();
        assert_eq!(
            outside,
            [
                None,
                Some(1),
                Some(1),
                Some(1),
                None,
                None,
                Some(1),
                None,
                None
            ]
        );
    }

    #[test]
    fn integers_and_text_convert_like_try_cast() {
        let b = bounds(-5.0, 5.0, 1);
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(3),
            Some(-9),
            Some(i64::MAX),
            None,
        ]));
        assert_eq!(
            decimals(&b.values(&ints).expect("values")),
            [Some(30), Some(-50), Some(50), None]
        );
        let outside: Vec<_> = b.outside(&ints).expect("outside").iter().collect();
        assert_eq!(outside, [None, Some(1), Some(1), None]);
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("2.5"), Some("abc"), None]));
        assert_eq!(
            decimals(&b.values(&text).expect("values")),
            [Some(25), None, None]
        );
    }

    #[test]
    fn float32_values_are_widened_first() {
        let b = bounds(0.0, 1.0, 3);
        let xs: ArrayRef = Arc::new(Float32Array::from(vec![
            Some(0.5f32),
            Some(f32::NAN),
            Some(2.0),
        ]));
        assert_eq!(
            decimals(&b.values(&xs).expect("values")),
            [Some(500), None, Some(1000)]
        );
    }

    #[test]
    fn reversed_or_huge_bounds_do_not_panic() {
        let xs: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.0), Some(f64::MAX)]));
        for b in [bounds(5.0, -5.0, 2), bounds(-1e300, 1e300, 2)] {
            let v = b.values(&xs).expect("values");
            assert_eq!(v.len(), 2);
            b.outside(&xs).expect("outside");
        }
    }

    fn float() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            Just(Some(f64::NAN)),
            Just(Some(f64::INFINITY)),
            Just(Some(f64::NEG_INFINITY)),
            (-1e6f64..1e6).prop_map(Some),
            any::<f64>().prop_map(Some),
        ]
    }

    #[test]
    fn rounding_matches_the_library_at_its_edges() {
        let edges = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            0.49999999999999994,
            -0.49999999999999994,
            2.5,
            -2.5,
            4503599627370495.5,
            -4503599627370495.5,
            4503599627370497.0,
            9.0e18,
            -9.0e18,
            8.999999999999999e18,
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for y in edges {
            assert_eq!(round_half_away(y), y.round() as i128, "{y}");
        }
    }

    proptest! {
        #[test]
        fn rounding_matches_the_library(
            y in any::<f64>().prop_filter("a number", |y| !y.is_nan()),
            half in -(1i64 << 51)..(1i64 << 51),
        ) {
            prop_assert_eq!(round_half_away(y), y.round() as i128);
            // Every value halfway between two integers that a float holds.
            let y = half as f64 + 0.5;
            prop_assert_eq!(round_half_away(y), y.round() as i128);
        }

        #[test]
        fn floats_match_the_reference_and_stay_within_the_bounds(
            xs in prop::collection::vec(float(), 0..40),
            lo in -1e5f64..1e5,
            width in 0f64..1e5,
            scale in 0i8..6,
        ) {
            let b = bounds(lo, lo + width, scale);
            let array: ArrayRef = Arc::new(Float64Array::from(xs.clone()));
            let got = decimals(&b.values(&array).expect("values"));
            prop_assert_eq!(&got, &reference(&b, &xs));
            for (x, v) in xs.iter().zip(&got) {
                let is_value = x.is_some_and(|x| !x.is_nan());
                prop_assert_eq!(v.is_some(), is_value);
                if let Some(v) = v {
                    prop_assert!(b.lo_fp <= *v && *v <= b.hi_fp);
                }
            }
            let outside: Vec<_> = b.outside(&array).expect("outside").iter().collect();
            for (x, o) in xs.iter().zip(outside) {
                let expected = x.filter(|x| !x.is_nan()).and_then(|x| (x < b.lo || x > b.hi).then_some(1));
                prop_assert_eq!(o, expected);
            }
        }

        #[test]
        fn integers_match_try_cast_and_stay_within_the_bounds(
            xs in prop::collection::vec(prop::option::of(any::<i64>()), 0..40),
            lo in -1000i64..1000,
            width in 0i64..1000,
            scale in 0i8..4,
        ) {
            let b = bounds(lo as f64, (lo + width) as f64, scale);
            let array: ArrayRef = Arc::new(Int64Array::from(xs.clone()));
            let got = decimals(&b.values(&array).expect("values"));
            let mul = 10i128.pow(scale as u32);
            for (x, v) in xs.iter().zip(&got) {
                let expected = x.map(|x| (i128::from(x) * mul).max(b.lo_fp).min(b.hi_fp));
                prop_assert_eq!(*v, expected);
            }
        }
    }
}
