//! The candidate grid of a DP quantile, and the two plan functions that turn
//! clamped values into a per-group histogram over it.
//!
//! A quantile is released by opendp's exponential mechanism over a fixed,
//! data-independent list of candidates spread over the column's declared
//! bounds. The mechanism's scores only compare values with candidates (how
//! many are below, how many above), so the executor does not need to return
//! any value: it returns, per group, how many kept values fall on each
//! candidate and strictly between each pair of neighbours, a histogram over
//! `2·count + 1` ranks. Rank `2i + 1` is candidate `i` itself and rank
//! `2i + 2` lies strictly between candidates `i` and `i + 1` (or above the
//! last one); clamping keeps every value at or above candidate 0. The broker
//! rebuilds, from the histogram alone, a dataset with the same order relations
//! to the candidates and hands it to opendp.
//!
//! `veil_quantile_rank` (scalar) and `veil_rank_histogram` (aggregate) are
//! never registered in a session: the rewrite inserts them directly.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, Int64Builder, ListArray, ListBuilder,
};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, Expr, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Most candidates a quantile is chosen from.
pub const MAX_CANDIDATES: i128 = 1000;

/// Evenly spaced candidates over a column's bounds, in fixed-point units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct QuantileGrid {
    /// The first candidate: the lower bound.
    pub lo_fp: i128,
    /// Distance between neighbouring candidates (at least one unit).
    pub step: i128,
    /// Number of candidates.
    pub count: usize,
}

impl QuantileGrid {
    /// At most [`MAX_CANDIDATES`] candidates from `lo_fp` to at most `hi_fp`.
    pub fn over(lo_fp: i128, hi_fp: i128) -> QuantileGrid {
        let span = (hi_fp - lo_fp).max(0);
        let step = ((span + MAX_CANDIDATES - 2) / (MAX_CANDIDATES - 1)).max(1);
        QuantileGrid {
            lo_fp,
            step,
            count: (span / step + 1) as usize,
        }
    }

    /// Number of ranks in a histogram.
    pub fn bins(&self) -> usize {
        2 * self.count + 1
    }

    /// The rank of a clamped value.
    pub fn rank(&self, v: i128) -> i64 {
        let offset = (v - self.lo_fp).max(0);
        let i = (offset / self.step).min(self.count as i128 - 1);
        let on_candidate = offset == i * self.step;
        (2 * i + if on_candidate { 1 } else { 2 }) as i64
    }

    /// The ranks of the candidates themselves, in order.
    pub fn candidate_ranks(&self) -> Vec<i64> {
        (0..self.count as i64).map(|i| 2 * i + 1).collect()
    }

    /// The candidate value (fixed point) of a candidate rank.
    pub fn candidate(&self, rank: i64) -> i128 {
        self.lo_fp + i128::from((rank - 1) / 2) * self.step
    }

    /// `veil_quantile_rank(value)`: the rank of a clamped decimal value.
    pub fn rank_of(self, value: Expr) -> Expr {
        self.rank_udf().call(vec![value])
    }

    /// The function behind [`Self::rank_of`].
    pub(crate) fn rank_udf(self) -> Arc<ScalarUDF> {
        Arc::new(ScalarUDF::new_from_impl(RankOf {
            grid: self,
            signature: Signature::any(1, Volatility::Immutable),
        }))
    }

    /// `veil_rank_histogram(ranks)`: per group, how many ranks fall in each
    /// bin; `ranks` is one rank or a list of them per row.
    pub fn histogram(self, ranks: Expr) -> Expr {
        histogram_udaf(self.bins()).call(vec![ranks])
    }
}

/// The function behind [`QuantileGrid::histogram`], over `bins` bins.
pub(crate) fn histogram_udaf(bins: usize) -> Arc<AggregateUDF> {
    Arc::new(AggregateUDF::new_from_impl(RankHistogram {
        bins,
        signature: Signature::any(1, Volatility::Immutable),
    }))
}

/// The grid of a `veil_quantile_rank` function (for the plan codec).
pub(crate) fn rank_grid(f: &ScalarUDF) -> Option<QuantileGrid> {
    (f.inner().as_ref() as &dyn std::any::Any)
        .downcast_ref::<RankOf>()
        .map(|r| r.grid)
}

/// The bins of a `veil_rank_histogram` function (for the plan codec).
pub(crate) fn histogram_bins(f: &AggregateUDF) -> Option<usize> {
    (f.inner().as_ref() as &dyn std::any::Any)
        .downcast_ref::<RankHistogram>()
        .map(|h| h.bins)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct RankOf {
    grid: QuantileGrid,
    signature: Signature,
}

impl ScalarUDFImpl for RankOf {
    fn name(&self) -> &str {
        "veil_quantile_rank"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [values] = arrays.as_slice() else {
            return internal_err!("veil_quantile_rank takes one argument");
        };
        let Some(decimals) = values.as_primitive_opt::<Decimal128Type>() else {
            return internal_err!("veil_quantile_rank takes a decimal");
        };
        let ranks: Int64Array = decimals
            .iter()
            .map(|v| v.map(|v| self.grid.rank(v)))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(ranks)))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct RankHistogram {
    bins: usize,
    signature: Signature,
}

fn counts_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
}

impl AggregateUDFImpl for RankHistogram {
    fn name(&self) -> &str {
        "veil_rank_histogram"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(counts_type())
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Histogram(vec![0; self.bins])))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[counts]", args.name),
            counts_type(),
            true,
        ))])
    }
}

/// Dense counts per rank.
#[derive(Debug)]
struct Histogram(Vec<i64>);

impl Histogram {
    fn add(&mut self, rank: i64, n: i64) {
        // Ranks come from the grid, so they are always in range.
        if let Some(slot) = usize::try_from(rank).ok().and_then(|r| self.0.get_mut(r)) {
            *slot += n;
        }
    }

    fn add_ranks(&mut self, ranks: &Int64Array) {
        for r in ranks.iter().flatten() {
            self.add(r, 1);
        }
    }

    fn add_lists(&mut self, lists: &ListArray, counts: bool) {
        for row in 0..lists.len() {
            if lists.is_null(row) {
                continue;
            }
            let inner = lists.value(row);
            let values = inner.as_primitive::<Int64Type>();
            if counts {
                for (rank, n) in values.iter().enumerate() {
                    self.add(rank as i64, n.unwrap_or(0));
                }
            } else {
                self.add_ranks(values);
            }
        }
    }

    fn as_list(&self) -> ScalarValue {
        let mut builder = ListBuilder::new(Int64Builder::with_capacity(self.0.len()));
        builder.values().append_slice(&self.0);
        builder.append(true);
        ScalarValue::List(Arc::new(builder.finish()))
    }
}

impl Accumulator for Histogram {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [ranks] = values else {
            return internal_err!("veil_rank_histogram takes one argument");
        };
        match ranks.data_type() {
            DataType::Int64 => self.add_ranks(ranks.as_primitive::<Int64Type>()),
            DataType::List(_) => self.add_lists(ranks.as_list::<i32>(), false),
            other => return internal_err!("veil_rank_histogram over {other}"),
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.as_list())
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.0.capacity() * size_of::<i64>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.as_list()])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [counts] = states else {
            return internal_err!("veil_rank_histogram state has one column");
        };
        self.add_lists(counts.as_list::<i32>(), true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Ranks order values against candidates exactly as the values do:
        /// below, on, or above each candidate.
        #[test]
        fn ranks_preserve_every_comparison_with_candidates(
            lo in -10_000i128..10_000, span in 0i128..100_000, offsets in prop::collection::vec(0i128..100_001, 1..50)
        ) {
            let grid = QuantileGrid::over(lo, lo + span);
            prop_assert!(grid.count as i128 <= MAX_CANDIDATES && grid.count >= 1);
            prop_assert!(grid.candidate(2 * grid.count as i64 - 1) <= lo + span);
            for off in offsets {
                let v = lo + off.min(span);
                let r = grid.rank(v);
                prop_assert!(r >= 1 && (r as usize) < grid.bins());
                for c in grid.candidate_ranks() {
                    prop_assert_eq!(r.cmp(&c), v.cmp(&grid.candidate(c)));
                }
            }
        }
    }

    #[test]
    fn histograms_count_scalars_lists_and_merge_states() {
        let grid = QuantileGrid::over(0, 10);
        let mut a = Histogram(vec![0; grid.bins()]);
        a.update_batch(&[Arc::new(Int64Array::from(vec![Some(1), None, Some(3)]))])
            .expect("scalars");
        let mut lists = ListBuilder::new(Int64Builder::new());
        lists.values().append_slice(&[3, 3]);
        lists.append(true);
        a.update_batch(&[Arc::new(lists.finish())]).expect("lists");
        let mut b = Histogram(vec![0; grid.bins()]);
        let state = a.state().expect("state");
        b.merge_batch(&[state[0].to_array().expect("array")])
            .expect("merge");
        assert_eq!(&b.0[..4], &[0, 1, 0, 3]);
    }
}
