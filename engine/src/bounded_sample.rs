//! `veil_bounded_sample`: an aggregate over at most `k` rows per group, the
//! ones with the smallest keyed priorities.
//!
//! Contribution bounding groups the rows by (unit, group key) and needs, per
//! pair, a count or a sum over at most `max_rows` rows chosen uniformly at
//! random. Ranking every row with a window function sorts the whole input;
//! this aggregate keeps a buffer of the `k` smallest (priority, value) pairs
//! per group instead, so the stage is one hash aggregation. Ties are broken by
//! value, so the kept multiset depends neither on the order rows arrive in nor
//! on how the input is partitioned. Like [`crate::keyed_hash`], it is never
//! registered in a session: the rewrite inserts it directly.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Int64Array, Int64Builder, ListArray,
    ListBuilder, UInt64Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, FieldRef, Int64Type, UInt64Type,
};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility,
};

use crate::rewrite::DECIMAL_PRECISION;

/// What the aggregate returns over the kept rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Output {
    /// The number of kept rows whose value is not NULL (`Int64`).
    Count,
    /// The exact sum of the kept non-NULL values (`Decimal128(38, scale)`).
    Sum {
        /// Decimal scale of the values.
        scale: i8,
    },
    /// The kept non-NULL values themselves (`Int64` in, `List<Int64>` out).
    Kept,
}

/// The aggregate function; see the module documentation.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct BoundedSample {
    k: usize,
    output: Output,
    signature: Signature,
}

impl BoundedSample {
    /// Counts the non-NULL `value`s among the `k` rows of smallest `priority`.
    pub fn count(k: u32, priority: Expr, value: Expr) -> Expr {
        Self::call(k, Output::Count, priority, value)
    }

    /// Sums the non-NULL `value`s (`Decimal128(38, scale)`) among the `k` rows
    /// of smallest `priority`.
    pub fn sum(k: u32, scale: i8, priority: Expr, value: Expr) -> Expr {
        Self::call(k, Output::Sum { scale }, priority, value)
    }

    /// The non-NULL `value`s (`Int64`) among the `k` rows of smallest
    /// `priority`, as a list.
    pub fn kept(k: u32, priority: Expr, value: Expr) -> Expr {
        Self::call(k, Output::Kept, priority, value)
    }

    fn call(k: u32, output: Output, priority: Expr, value: Expr) -> Expr {
        let udaf = AggregateUDF::new_from_impl(BoundedSample {
            k: k as usize,
            output,
            signature: Signature::any(2, Volatility::Immutable),
        });
        Arc::new(udaf).call(vec![priority, value])
    }

    fn value_type(&self) -> DataType {
        match self.output {
            Output::Count | Output::Kept => DataType::Decimal128(DECIMAL_PRECISION, 0),
            Output::Sum { scale } => DataType::Decimal128(DECIMAL_PRECISION, scale),
        }
    }

    fn accumulate(&self) -> Groups {
        Groups {
            k: self.k,
            output: self.output,
            value_type: self.value_type(),
            groups: Vec::new(),
            entries: 0,
        }
    }
}

impl AggregateUDFImpl for BoundedSample {
    fn name(&self) -> &str {
        "veil_bounded_sample"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match (self.output, arg_types) {
            (Output::Count, [DataType::UInt64, _]) => Ok(DataType::Int64),
            (Output::Sum { scale }, [DataType::UInt64, DataType::Decimal128(_, s)])
                if *s == scale =>
            {
                Ok(self.value_type())
            }
            (Output::Kept, [DataType::UInt64, DataType::Int64]) => Ok(kept_type()),
            _ => internal_err!("veil_bounded_sample over {arg_types:?}"),
        }
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let mut one = self.accumulate();
        one.groups.push(Kept::default());
        Ok(Box::new(Single(one)))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |name: &str, item: DataType| {
            Arc::new(Field::new(
                format!("{}[{name}]", args.name),
                DataType::List(Arc::new(Field::new_list_field(item, true))),
                true,
            ))
        };
        Ok(vec![
            list("priorities", DataType::UInt64),
            list("values", self.value_type()),
        ])
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.accumulate()))
    }
}

fn kept_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
}

/// The kept (priority, value) pairs of one group: the `k` smallest seen.
#[derive(Debug, Default, Clone)]
struct Kept(Vec<(u64, Option<i128>)>);

impl Kept {
    /// Offers a pair; returns whether the buffer grew.
    fn offer(&mut self, k: usize, pair: (u64, Option<i128>)) -> bool {
        if self.0.len() < k {
            if self.0.capacity() == 0 {
                // One allocation per group, not one per doubling.
                self.0.reserve_exact(k.min(16));
            }
            self.0.push(pair);
            return true;
        }
        if let Some((i, largest)) = self.0.iter().enumerate().max_by_key(|(_, e)| **e)
            && pair < *largest
        {
            self.0[i] = pair;
        }
        false
    }
}

/// Per-group state of the aggregate.
struct Groups {
    k: usize,
    output: Output,
    value_type: DataType,
    groups: Vec<Kept>,
    entries: usize,
}

impl Groups {
    fn offer(&mut self, group: usize, pair: (u64, Option<i128>)) {
        if self.groups[group].offer(self.k, pair) {
            self.entries += 1;
        }
    }

    /// The (priority, value) pair of each input row; `None` for rows to skip.
    fn pairs<'a>(
        &self,
        values: &'a [ArrayRef],
        filter: Option<&'a BooleanArray>,
    ) -> Result<impl Iterator<Item = Option<(u64, Option<i128>)>> + 'a> {
        let [priority, value] = values else {
            return internal_err!("veil_bounded_sample takes two arguments");
        };
        let priority = priority.as_primitive::<UInt64Type>();
        let sums = match self.output {
            Output::Sum { .. } => Some(value.as_primitive::<Decimal128Type>()),
            Output::Count | Output::Kept => None,
        };
        let ints = match self.output {
            Output::Kept => Some(value.as_primitive::<Int64Type>()),
            Output::Count | Output::Sum { .. } => None,
        };
        let nulls = value.logical_nulls();
        Ok((0..priority.len()).map(move |row| {
            let included = filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            if !included || priority.is_null(row) {
                return None;
            }
            let v = if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                None
            } else if let Some(ints) = ints {
                Some(i128::from(ints.value(row)))
            } else {
                Some(sums.map_or(0, |s| s.value(row)))
            };
            Some((priority.value(row), v))
        }))
    }

    /// Offers every pair of each state row (lists of priorities and values).
    fn merge(&mut self, states: &[ArrayRef], group_of: impl Fn(usize) -> usize) -> Result<()> {
        let [priorities, values] = states else {
            return internal_err!("veil_bounded_sample state has two columns");
        };
        let (priorities, values) = (priorities.as_list::<i32>(), values.as_list::<i32>());
        let (ps, vs) = (
            priorities.values().as_primitive::<UInt64Type>().clone(),
            values.values().as_primitive::<Decimal128Type>().clone(),
        );
        for row in 0..priorities.len() {
            let range = priorities.value_offsets()[row] as usize
                ..priorities.value_offsets()[row + 1] as usize;
            let start = values.value_offsets()[row] as usize;
            for (n, i) in range.enumerate() {
                let v = (!vs.is_null(start + n)).then(|| vs.value(start + n));
                self.offer(group_of(row), (ps.value(i), v));
            }
        }
        Ok(())
    }

    fn result(&self, groups: &[Kept]) -> Result<ArrayRef> {
        Ok(match self.output {
            Output::Count => Arc::new(Int64Array::from_iter_values(
                groups
                    .iter()
                    .map(|g| g.0.iter().filter(|(_, v)| v.is_some()).count() as i64),
            )),
            Output::Sum { .. } => {
                let mut sums = Vec::with_capacity(groups.len());
                for g in groups {
                    let mut sum: Option<i128> = None;
                    for v in g.0.iter().filter_map(|(_, v)| *v) {
                        // The rewrite checks that k values at the bounds fit.
                        sum = Some(sum.unwrap_or(0).checked_add(v).ok_or_else(|| {
                            datafusion::error::DataFusionError::Internal(
                                "bounded sample sum overflow".into(),
                            )
                        })?);
                    }
                    sums.push(sum);
                }
                Arc::new(Decimal128Array::from(sums).with_data_type(self.value_type.clone()))
            }
            Output::Kept => {
                let mut lists = ListBuilder::new(Int64Builder::new());
                for g in groups {
                    for v in g.0.iter().filter_map(|(_, v)| *v) {
                        // Values came in as Int64.
                        lists.values().append_value(v as i64);
                    }
                    lists.append(true);
                }
                Arc::new(lists.finish())
            }
        })
    }

    fn state_of(&self, groups: &[Kept]) -> Vec<ArrayRef> {
        let offsets = OffsetBuffer::from_lengths(groups.iter().map(|g| g.0.len()));
        let pairs = groups.iter().flat_map(|g| g.0.iter());
        let priorities = UInt64Array::from_iter_values(pairs.clone().map(|(p, _)| *p));
        let values = Decimal128Array::from_iter(pairs.map(|(_, v)| *v))
            .with_data_type(self.value_type.clone());
        let list = |item: DataType, values: ArrayRef| -> ArrayRef {
            Arc::new(ListArray::new(
                Arc::new(Field::new_list_field(item, true)),
                offsets.clone(),
                values,
                None,
            ))
        };
        vec![
            list(DataType::UInt64, Arc::new(priorities)),
            list(self.value_type.clone(), Arc::new(values)),
        ]
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<Kept> {
        let taken = emit_to.take_needed(&mut self.groups);
        self.entries -= taken.iter().map(|g| g.0.len()).sum::<usize>();
        taken
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Kept::default);
        let pairs: Vec<_> = self.pairs(values, opt_filter)?.collect();
        for (pair, &group) in pairs.into_iter().zip(group_indices) {
            if let Some(pair) = pair {
                self.offer(group, pair);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let taken = self.take(emit_to);
        self.result(&taken)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let taken = self.take(emit_to);
        Ok(self.state_of(&taken))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Kept::default);
        self.merge(values, |row| group_indices[row])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows: Vec<Kept> = self
            .pairs(values, opt_filter)?
            .map(|pair| Kept(pair.into_iter().collect()))
            .collect();
        Ok(self.state_of(&rows))
    }

    fn size(&self) -> usize {
        self.groups.capacity() * size_of::<Kept>() + self.entries * size_of::<(u64, Option<i128>)>()
    }
}

/// The single-group form (aggregates without GROUP BY).
struct Single(Groups);

impl std::fmt::Debug for Single {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundedSample")
    }
}

impl Accumulator for Single {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let pairs: Vec<_> = self.0.pairs(values, None)?.flatten().collect();
        for pair in pairs {
            self.0.offer(0, pair);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        ScalarValue::try_from_array(&self.0.result(&self.0.groups)?, 0)
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.0.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0
            .state_of(&self.0.groups)
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.0.merge(states, |_| 0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SCALE: i8 = 2;

    fn sample(output: Output, k: usize) -> Groups {
        BoundedSample {
            k,
            output,
            signature: Signature::any(2, Volatility::Immutable),
        }
        .accumulate()
    }

    fn inputs(rows: &[(u64, Option<i128>)]) -> Vec<ArrayRef> {
        typed_inputs(rows, Output::Sum { scale: SCALE })
    }

    fn typed_inputs(rows: &[(u64, Option<i128>)], output: Output) -> Vec<ArrayRef> {
        let values: ArrayRef = match output {
            Output::Kept => Arc::new(Int64Array::from_iter(
                rows.iter().map(|r| r.1.map(|v| v as i64)),
            )),
            _ => Arc::new(
                Decimal128Array::from_iter(rows.iter().map(|r| r.1))
                    .with_data_type(DataType::Decimal128(DECIMAL_PRECISION, SCALE)),
            ),
        };
        vec![
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.0))),
            values,
        ]
    }

    /// Reference: sort by (priority, value), keep k, then count or sum.
    fn reference(rows: &[(u64, Option<i128>)], k: usize) -> (i64, Option<i128>, Vec<i128>) {
        let mut sorted = rows.to_vec();
        sorted.sort();
        sorted.truncate(k);
        let mut kept: Vec<i128> = sorted.iter().filter_map(|r| r.1).collect();
        let sum = (!kept.is_empty()).then(|| kept.iter().sum());
        kept.sort();
        (kept.len() as i64, sum, kept)
    }

    fn rows() -> impl Strategy<Value = Vec<(u8, u64, Option<i128>)>> {
        // Few distinct priorities, so ties between rows are common.
        prop::collection::vec((0u8..3, 0u64..8, prop::option::of(-1000i128..1000)), 0..60)
    }

    proptest! {
        /// Split across two partial accumulators (as partitions would be),
        /// merged through the state lists, the result equals the reference on
        /// every group, whatever the order and split of the rows.
        #[test]
        fn partial_merge_equals_sorting_reference(rows in rows(), k in 1usize..6, split in 0usize..60) {
            let split = split.min(rows.len());
            for output in [Output::Count, Output::Sum { scale: SCALE }, Output::Kept] {
                let mut finals = sample(output, k);
                for part in [&rows[..split], &rows[split..]] {
                    let mut partial = sample(output, k);
                    let pairs: Vec<_> = part.iter().map(|r| (r.1, r.2)).collect();
                    let groups: Vec<usize> = part.iter().map(|r| usize::from(r.0)).collect();
                    partial.update_batch(&typed_inputs(&pairs, output), &groups, None, 3).expect("update");
                    let state = partial.state(EmitTo::All).expect("state");
                    finals.merge_batch(&state, &[0, 1, 2], 3).expect("merge");
                }
                let out = finals.evaluate(EmitTo::All).expect("evaluate");
                for g in 0..3u8 {
                    let mine: Vec<_> = rows.iter().filter(|r| r.0 == g).map(|r| (r.1, r.2)).collect();
                    let (count, sum, kept) = reference(&mine, k);
                    match output {
                        Output::Count => prop_assert_eq!(out.as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(usize::from(g)), count),
                        Output::Sum { .. } => {
                            let s = out.as_primitive::<Decimal128Type>();
                            let got = (!s.is_null(usize::from(g))).then(|| s.value(usize::from(g)));
                            prop_assert_eq!(got, sum);
                        }
                        Output::Kept => {
                            let list = out.as_list::<i32>().value(usize::from(g));
                            let mut got: Vec<i128> = list.as_primitive::<Int64Type>().values().iter().map(|v| i128::from(*v)).collect();
                            got.sort();
                            prop_assert_eq!(got, kept);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn convert_to_state_keeps_each_row_and_drops_filtered_ones() {
        let acc = sample(Output::Count, 2);
        let filter = BooleanArray::from(vec![true, false, true]);
        let state = acc
            .convert_to_state(
                &inputs(&[(1, Some(5)), (2, None), (3, None)]),
                Some(&filter),
            )
            .expect("state");
        let lists = state[0].as_list::<i32>();
        assert_eq!(lists.value_offsets(), &[0, 1, 1, 2]);
    }

    #[test]
    fn emit_first_keeps_the_remaining_groups() {
        let mut acc = sample(Output::Count, 1);
        acc.update_batch(&inputs(&[(1, Some(1)), (2, Some(2))]), &[0, 1], None, 2)
            .expect("update");
        let first = acc.evaluate(EmitTo::First(1)).expect("first");
        assert_eq!(first.len(), 1);
        let rest = acc.evaluate(EmitTo::All).expect("rest");
        assert_eq!(rest.len(), 1);
        assert_eq!(acc.entries, 0);
    }
}
