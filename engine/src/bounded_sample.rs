//! `veil_bounded_sample`: statistics over at most `k` rows per group, the ones
//! with the smallest keyed priorities.
//!
//! Contribution bounding groups the rows by (unit, group key) and needs, per
//! pair, counts, sums and kept values over at most `max_rows` rows chosen
//! uniformly at random. Ranking every row with a window function sorts the
//! whole input; this aggregate keeps a buffer of the `k` smallest entries
//! (one value per input column) per group instead, so the stage is one hash
//! aggregation, and one sample serves every statistic of the query.
//!
//! An entry's priority is SipHash-1-3, under the per-query key, of its values;
//! ties are broken by the values, so the kept multiset depends neither on the
//! order rows arrive in nor on how the input is partitioned. Priorities are
//! computed only for groups that overflow `k` (until then every entry is
//! kept, whatever its priority), so most groups never hash: the state carries
//! values only. Like [`crate::keyed_hash`], it is never registered in a
//! session: the rewrite inserts it directly.
//!
//! The result is a struct with one field per requested [`Output`], named by
//! [`BoundedSample::field`].

use std::cmp::Ordering;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Int64Array, Int64Builder, ListArray,
    ListBuilder, StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef, Fields, Int64Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility,
};

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use crate::rewrite::DECIMAL_PRECISION;

/// One statistic of the sample, over one of its value columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Output {
    /// The number of kept rows whose value is not NULL (`Int64`).
    Count(usize),
    /// The exact sum of the kept non-NULL values (a `Decimal128(38, s)`
    /// column; the sum has its type).
    Sum(usize),
    /// The kept non-NULL values themselves (an `Int64` column; a
    /// `List<Int64>`).
    Kept(usize),
}

/// The aggregate function; see the module documentation. Its key never
/// appears in plans, logs or `Debug` output.
#[derive(PartialEq, Eq, Hash)]
pub struct BoundedSample {
    k: usize,
    key: [u8; 16],
    outputs: Vec<Output>,
    signature: Signature,
}

impl std::fmt::Debug for BoundedSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BoundedSample {{ k: {}, key: <redacted> }}", self.k)
    }
}

impl BoundedSample {
    /// `veil_bounded_sample(values…)` keeping the `k` rows per group of
    /// smallest priority under `key` and computing `outputs` over them.
    pub fn call(k: u32, key: [u8; 16], values: Vec<Expr>, outputs: Vec<Output>) -> Expr {
        Self::udaf(k, key, outputs).call(values)
    }

    /// The function keeping `k` rows per group under `key`.
    pub(crate) fn udaf(k: u32, key: [u8; 16], outputs: Vec<Output>) -> Arc<AggregateUDF> {
        Arc::new(AggregateUDF::new_from_impl(BoundedSample {
            k: k as usize,
            key,
            outputs,
            signature: Signature::variadic_any(Volatility::Immutable),
        }))
    }

    /// `k`, the key and the outputs (for the plan codec only).
    pub(crate) fn parameters(&self) -> (u32, [u8; 16], Vec<Output>) {
        (self.k as u32, self.key, self.outputs.clone())
    }

    /// The struct field holding the `n`-th output.
    pub fn field(n: usize) -> String {
        format!("o{n}")
    }

    fn accumulate(&self, width: usize) -> Groups {
        Groups {
            k: self.k,
            key: self.key,
            width,
            outputs: self.outputs.clone(),
            result_fields: Fields::empty(),
            groups: Vec::new(),
            entries: 0,
        }
    }

    fn result_fields(&self, arg_types: &[DataType]) -> Result<Fields> {
        let values = arg_types;
        self.outputs
            .iter()
            .enumerate()
            .map(|(n, o)| {
                let t = match *o {
                    Output::Count(_) => DataType::Int64,
                    Output::Sum(i) => match values.get(i) {
                        Some(t @ DataType::Decimal128(..)) => t.clone(),
                        other => return internal_err!("veil_bounded_sample sums {other:?}"),
                    },
                    Output::Kept(_) => kept_type(),
                };
                Ok(Field::new(Self::field(n), t, true))
            })
            .collect()
    }

    fn groups_for(&self, args: &AccumulatorArgs) -> Result<Groups> {
        let types: Vec<DataType> = args
            .exprs
            .iter()
            .map(|e| e.data_type(args.schema))
            .collect::<Result<_>>()?;
        let mut g = self.accumulate(types.len());
        g.result_fields = self.result_fields(&types)?;
        Ok(g)
    }
}

fn kept_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
}

/// The storage type of every value in the state lists.
fn raw_type() -> DataType {
    DataType::Decimal128(DECIMAL_PRECISION, 0)
}

impl AggregateUDFImpl for BoundedSample {
    fn name(&self) -> &str {
        "veil_bounded_sample"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Struct(self.result_fields(arg_types)?))
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let mut one = self.groups_for(&args)?;
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
        Ok(vec![list("values", raw_type())])
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.groups_for(&args)?))
    }
}

/// NULL in an entry: below every Decimal128(38) value and every `i64`, so
/// entries order as `None < Some` would.
const NULL: i128 = i128::MIN;

/// The kept entries of one group, the `k` smallest seen, in one buffer of
/// `width` values per entry ([`NULL`] for NULL), and, once the group has
/// overflowed `k`, each entry's priority. Entries compare by priority, ties
/// by their values.
#[derive(Debug, Default, Clone)]
struct Kept {
    values: Vec<i128>,
    priorities: Vec<u64>,
    /// The index of the largest entry, once priorities are known.
    largest: usize,
}

impl Kept {
    fn len(&self, width: usize) -> usize {
        self.values.len() / width.max(1)
    }

    fn entry(&self, i: usize, width: usize) -> &[i128] {
        &self.values[i * width..(i + 1) * width]
    }

    /// Offers an entry; returns whether the buffer grew.
    fn offer(&mut self, k: usize, key: &[u8; 16], entry: &[i128]) -> bool {
        let width = entry.len();
        let n = self.len(width);
        if n < k {
            if self.priorities.is_empty() {
                self.keep_all(k, width, entry.iter().copied());
            } else {
                self.values.extend_from_slice(entry);
                self.priorities.push(priority(key, entry));
            }
            return true;
        }
        if self.priorities.is_empty() {
            self.priorities = (0..n)
                .map(|i| priority(key, self.entry(i, width)))
                .collect();
            self.largest = self.find_largest(width);
        }
        let p = priority(key, entry);
        let l = self.largest;
        if (p, entry) < (self.priorities[l], self.entry(l, width)) {
            self.values[l * width..(l + 1) * width].copy_from_slice(entry);
            self.priorities[l] = p;
            self.largest = self.find_largest(width);
        }
        false
    }

    /// Appends whole entries to a group that has not overflowed and will
    /// not: every entry is kept, whatever its priority, so none is hashed.
    fn keep_all(&mut self, k: usize, width: usize, values: impl IntoIterator<Item = i128>) {
        if self.values.capacity() == 0 {
            // One allocation per group, not one per doubling.
            self.values.reserve_exact(k.min(16) * width);
        }
        self.values.extend(values);
    }

    /// The index of the largest entry by (priority, values).
    fn find_largest(&self, width: usize) -> usize {
        let mut largest = 0;
        for i in 1..self.priorities.len() {
            let a = (self.priorities[i], self.entry(i, width));
            let b = (self.priorities[largest], self.entry(largest, width));
            if a.cmp(&b) == Ordering::Greater {
                largest = i;
            }
        }
        largest
    }

    /// The non-NULL values of column `c` among the kept entries.
    fn column(&self, c: usize, width: usize) -> impl Iterator<Item = i128> + '_ {
        self.values
            .chunks_exact(width.max(1))
            .map(move |e| e[c])
            .filter(|v| *v != NULL)
    }
}

/// An entry's priority: SipHash-1-3 under the per-query key of its values.
fn priority(key: &[u8; 16], entry: &[i128]) -> u64 {
    let mut h = SipHasher13::new_with_key(key);
    for v in entry {
        h.write(&v.to_le_bytes());
    }
    h.finish()
}

/// How one value column is read: its values, or only whether they are NULL.
enum Reader<'a> {
    Decimal(&'a Decimal128Array),
    Int(&'a Int64Array),
    Validity(Option<NullBuffer>),
}

impl Reader<'_> {
    fn read(&self, row: usize) -> i128 {
        match self {
            Reader::Decimal(a) if a.is_valid(row) => a.value(row),
            Reader::Int(a) if a.is_valid(row) => i128::from(a.value(row)),
            Reader::Validity(nulls) if !nulls.as_ref().is_some_and(|n| n.is_null(row)) => 0,
            _ => NULL,
        }
    }
}

/// Per-group state of the aggregate.
struct Groups {
    k: usize,
    key: [u8; 16],
    width: usize,
    outputs: Vec<Output>,
    result_fields: Fields,
    groups: Vec<Kept>,
    entries: usize,
}

impl Groups {
    /// Offers every included input row to the group `group_of(row)`.
    fn offer_rows(
        &mut self,
        columns: &[ArrayRef],
        filter: Option<&BooleanArray>,
        mut group_of: impl FnMut(usize) -> usize,
    ) -> Result<()> {
        if columns.len() != self.width || columns.is_empty() {
            return internal_err!("veil_bounded_sample takes {} value columns", self.width);
        }
        let readers: Vec<Reader<'_>> = columns
            .iter()
            .map(|c| match c.data_type() {
                DataType::Decimal128(..) => Reader::Decimal(c.as_primitive::<Decimal128Type>()),
                DataType::Int64 => Reader::Int(c.as_primitive::<Int64Type>()),
                _ => Reader::Validity(c.logical_nulls()),
            })
            .collect();
        let mut entry = vec![NULL; self.width];
        for row in 0..columns[0].len() {
            if !filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                continue;
            }
            for (slot, reader) in entry.iter_mut().zip(&readers) {
                *slot = reader.read(row);
            }
            let group = group_of(row);
            if self.groups[group].offer(self.k, &self.key, &entry) {
                self.entries += 1;
            }
        }
        Ok(())
    }

    /// Offers every entry of each state row (a list of values, `width` per
    /// entry). While a group stays within `k` entries, a row's entries are
    /// appended at once.
    fn merge(&mut self, states: &[ArrayRef], group_of: impl Fn(usize) -> usize) -> Result<()> {
        let [values] = states else {
            return internal_err!("veil_bounded_sample state has one column");
        };
        let values = values.as_list::<i32>();
        let vs = values.values().as_primitive::<Decimal128Type>();
        let (raw, nulls) = (vs.values(), vs.nulls());
        let read = |i: usize| match nulls {
            Some(n) if n.is_null(i) => NULL,
            _ => raw[i],
        };
        let offsets = values.value_offsets();
        let w = self.width.max(1);
        let mut entry = vec![NULL; w];
        for row in 0..values.len() {
            let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
            if (end - start) % w != 0 {
                return internal_err!("veil_bounded_sample state has partial entries");
            }
            let group = &mut self.groups[group_of(row)];
            let incoming = (end - start) / w;
            if group.priorities.is_empty() && group.len(w) + incoming <= self.k {
                group.keep_all(self.k, w, (start..end).map(read));
                self.entries += incoming;
                continue;
            }
            for at in (start..end).step_by(w) {
                for (c, slot) in entry.iter_mut().enumerate() {
                    *slot = read(at + c);
                }
                if group.offer(self.k, &self.key, &entry) {
                    self.entries += 1;
                }
            }
        }
        Ok(())
    }

    fn result(&self, groups: &[Kept]) -> Result<ArrayRef> {
        let stride = self.width;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.outputs.len());
        for (n, output) in self.outputs.iter().enumerate() {
            arrays.push(match *output {
                Output::Count(c) => Arc::new(Int64Array::from_iter_values(
                    groups.iter().map(|g| g.column(c, stride).count() as i64),
                )),
                Output::Sum(c) => {
                    let mut sums = Vec::with_capacity(groups.len());
                    for g in groups {
                        let mut sum: Option<i128> = None;
                        for v in g.column(c, stride) {
                            // The rewrite checks that k values at the bounds fit.
                            sum = Some(sum.unwrap_or(0).checked_add(v).ok_or_else(|| {
                                datafusion::error::DataFusionError::Internal(
                                    "bounded sample sum overflow".into(),
                                )
                            })?);
                        }
                        sums.push(sum);
                    }
                    Arc::new(
                        Decimal128Array::from(sums)
                            .with_data_type(self.result_fields[n].data_type().clone()),
                    )
                }
                Output::Kept(c) => {
                    let mut lists = ListBuilder::new(Int64Builder::new());
                    for g in groups {
                        for v in g.column(c, stride) {
                            // Values came in as Int64.
                            lists.values().append_value(v as i64);
                        }
                        lists.append(true);
                    }
                    Arc::new(lists.finish())
                }
            });
        }
        Ok(Arc::new(StructArray::try_new(
            self.result_fields.clone(),
            arrays,
            None,
        )?))
    }

    fn state_of(&self, groups: &[Kept]) -> Vec<ArrayRef> {
        let all = || groups.iter().flat_map(|g| g.values.iter().copied());
        let nulls = all()
            .any(|v| v == NULL)
            .then(|| NullBuffer::from_iter(all().map(|v| v != NULL)));
        let raw: Vec<i128> = all().map(|v| if v == NULL { 0 } else { v }).collect();
        let values = Decimal128Array::new(raw.into(), nulls).with_data_type(raw_type());
        vec![Arc::new(ListArray::new(
            Arc::new(Field::new_list_field(raw_type(), true)),
            OffsetBuffer::from_lengths(groups.iter().map(|g| g.values.len())),
            Arc::new(values),
            None,
        ))]
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<Kept> {
        let taken = emit_to.take_needed(&mut self.groups);
        self.entries -= taken.iter().map(|g| g.len(self.width)).sum::<usize>();
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
        self.offer_rows(values, opt_filter, |row| group_indices[row])
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
        // Each row is its own group of one entry (or none, when filtered).
        let rows = values.first().map_or(0, |a| a.len());
        let mut each = Groups {
            k: 1,
            key: self.key,
            width: self.width,
            outputs: vec![],
            result_fields: Fields::empty(),
            groups: vec![Kept::default(); rows],
            entries: 0,
        };
        each.offer_rows(values, opt_filter, |row| row)?;
        Ok(each.state_of(&each.groups))
    }

    fn size(&self) -> usize {
        self.groups.capacity() * size_of::<Kept>()
            + self.entries * (self.width * size_of::<i128>() + size_of::<u64>())
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
        self.0.offer_rows(values, None, |_| 0)
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

    /// A sampler over two columns: a decimal (counted and summed) and an
    /// integer (kept).
    fn sample(k: usize) -> Groups {
        let udaf = BoundedSample {
            k,
            key: KEY,
            outputs: vec![Output::Count(0), Output::Sum(0), Output::Kept(1)],
            signature: Signature::variadic_any(Volatility::Immutable),
        };
        let mut g = udaf.accumulate(2);
        g.result_fields = udaf
            .result_fields(&[
                DataType::Decimal128(DECIMAL_PRECISION, SCALE),
                DataType::Int64,
            ])
            .expect("fields");
        g
    }

    const KEY: [u8; 16] = [9; 16];

    type Row = (Option<i128>, Option<i64>);

    fn inputs(rows: &[Row]) -> Vec<ArrayRef> {
        vec![
            Arc::new(
                Decimal128Array::from_iter(rows.iter().map(|r| r.0))
                    .with_data_type(DataType::Decimal128(DECIMAL_PRECISION, SCALE)),
            ),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.1))),
        ]
    }

    /// Reference: rank every entry by (keyed hash of its values, values),
    /// keep `k`, then count, sum and list.
    fn reference(rows: &[Row], k: usize) -> (i64, Option<i128>, Vec<i64>) {
        let mut ranked: Vec<(u64, Vec<i128>)> = rows
            .iter()
            .map(|r| {
                let entry = vec![r.0.unwrap_or(NULL), r.1.map_or(NULL, i128::from)];
                (priority(&KEY, &entry), entry)
            })
            .collect();
        ranked.sort();
        ranked.truncate(k);
        let decimals: Vec<i128> = ranked
            .iter()
            .map(|e| e.1[0])
            .filter(|v| *v != NULL)
            .collect();
        let sum = (!decimals.is_empty()).then(|| decimals.iter().sum());
        let mut ints: Vec<i64> = ranked
            .iter()
            .map(|e| e.1[1])
            .filter(|v| *v != NULL)
            .map(|v| v as i64)
            .collect();
        ints.sort();
        (decimals.len() as i64, sum, ints)
    }

    fn rows() -> impl Strategy<Value = Vec<(u8, Row)>> {
        // Few distinct values, so equal entries are common.
        prop::collection::vec(
            (
                0u8..3,
                (prop::option::of(-5i128..5), prop::option::of(0i64..3)),
            ),
            0..60,
        )
    }

    proptest! {
        /// Split across two partial accumulators (as partitions would be),
        /// merged through the state lists, every output equals the reference
        /// on every group, whatever the order and split of the rows.
        #[test]
        fn partial_merge_equals_sorting_reference(rows in rows(), k in 1usize..6, split in 0usize..60) {
            let split = split.min(rows.len());
            let mut finals = sample(k);
            for part in [&rows[..split], &rows[split..]] {
                let mut partial = sample(k);
                let entries: Vec<Row> = part.iter().map(|r| r.1).collect();
                let groups: Vec<usize> = part.iter().map(|r| usize::from(r.0)).collect();
                partial.update_batch(&inputs(&entries), &groups, None, 3).expect("update");
                let state = partial.state(EmitTo::All).expect("state");
                finals.merge_batch(&state, &[0, 1, 2], 3).expect("merge");
            }
            let out = finals.evaluate(EmitTo::All).expect("evaluate");
            let out = out.as_struct();
            for g in 0..3u8 {
                let mine: Vec<Row> = rows.iter().filter(|r| r.0 == g).map(|r| r.1).collect();
                let (count, sum, kept) = reference(&mine, k);
                let g = usize::from(g);
                prop_assert_eq!(out.column(0).as_primitive::<Int64Type>().value(g), count);
                let s = out.column(1).as_primitive::<Decimal128Type>();
                prop_assert_eq!((!s.is_null(g)).then(|| s.value(g)), sum);
                let list = out.column(2).as_list::<i32>().value(g);
                let mut got: Vec<i64> = list.as_primitive::<Int64Type>().values().to_vec();
                got.sort();
                prop_assert_eq!(got, kept);
            }
        }
    }

    #[test]
    fn convert_to_state_keeps_each_row_and_drops_filtered_ones() {
        let acc = sample(2);
        let filter = BooleanArray::from(vec![true, false, true]);
        let state = acc
            .convert_to_state(
                &inputs(&[(Some(5), None), (None, Some(1)), (None, None)]),
                Some(&filter),
            )
            .expect("state");
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].as_list::<i32>().value_offsets(), &[0, 2, 2, 4]);
    }

    #[test]
    fn debug_hides_the_key() {
        let udaf = BoundedSample {
            k: 3,
            key: [7; 16],
            outputs: vec![],
            signature: Signature::variadic_any(Volatility::Immutable),
        };
        assert!(!format!("{udaf:?}").contains('7'));
    }

    #[test]
    fn emit_first_keeps_the_remaining_groups() {
        let mut acc = sample(1);
        acc.update_batch(
            &inputs(&[(Some(1), None), (Some(2), None)]),
            &[0, 1],
            None,
            2,
        )
        .expect("update");
        let first = acc.evaluate(EmitTo::First(1)).expect("first");
        assert_eq!(first.len(), 1);
        let rest = acc.evaluate(EmitTo::All).expect("rest");
        assert_eq!(rest.len(), 1);
        assert_eq!(acc.entries, 0);
    }
}
