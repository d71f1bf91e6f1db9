//! The bundled Beijing example: a deterministic generator of synthetic
//! public-data tables (same bytes for the same seed and scale).
//!
//! Distributions are Beijing-shaped: 16 districts with 2020-census population
//! shares, an age pyramid, social-insurance wage bases with a long tail,
//! ICD-10 chapters, USCC codes with valid check characters. Nothing here is
//! real data.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use datafusion::arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Seed of the bundled example.
pub const DEFAULT_SEED: u64 = 20_260_101;
/// Residents at scale 1.
pub const BASE_RESIDENTS: f64 = 200_000.0;
/// Format version written to the manifest; bump when the output changes.
const GENERATOR_VERSION: u32 = 1;

/// (code, name, 2020 census population in 10k, area km²).
pub const DISTRICTS: [(&str, &str, f64, f64); 16] = [
    ("110101", "东城区", 70.9, 41.84),
    ("110102", "西城区", 110.6, 50.70),
    ("110105", "朝阳区", 345.2, 470.80),
    ("110106", "丰台区", 201.9, 305.80),
    ("110107", "石景山区", 56.8, 84.32),
    ("110108", "海淀区", 313.3, 430.80),
    ("110109", "门头沟区", 39.3, 1447.85),
    ("110111", "房山区", 131.3, 1989.54),
    ("110112", "通州区", 184.0, 906.28),
    ("110113", "顺义区", 132.4, 1019.89),
    ("110114", "昌平区", 226.9, 1343.54),
    ("110115", "大兴区", 199.4, 1036.32),
    ("110116", "怀柔区", 44.1, 2122.62),
    ("110117", "平谷区", 45.7, 950.13),
    ("110118", "密云区", 52.8, 2229.45),
    ("110119", "延庆区", 34.6, 1993.75),
];

/// ICD-10 chapters with relative outpatient frequency and a typical diagnosis.
const ICD10: [(&str, f64, &str); 22] = [
    ("I", 3.0, "病毒性肠炎"),
    ("II", 2.0, "乳腺良性肿瘤"),
    ("III", 0.8, "缺铁性贫血"),
    ("IV", 9.0, "2型糖尿病"),
    ("V", 2.5, "焦虑状态"),
    ("VI", 3.0, "偏头痛"),
    ("VII", 4.0, "结膜炎"),
    ("VIII", 1.5, "中耳炎"),
    ("IX", 14.0, "原发性高血压"),
    ("X", 18.0, "急性上呼吸道感染"),
    ("XI", 9.0, "慢性胃炎"),
    ("XII", 4.0, "湿疹"),
    ("XIII", 9.0, "腰椎间盘突出"),
    ("XIV", 4.5, "泌尿道感染"),
    ("XV", 1.2, "早孕检查"),
    ("XVI", 0.3, "新生儿黄疸"),
    ("XVII", 0.2, "先天性心脏病随访"),
    ("XVIII", 5.0, "头晕"),
    ("XIX", 3.0, "踝关节扭伤"),
    ("XX", 0.3, "犬咬伤"),
    ("XXI", 5.0, "健康体检"),
    ("XXII", 0.7, "特殊筛查"),
];

const INDUSTRIES: [(&str, f64); 14] = [
    ("I65", 16.0),
    ("I64", 6.0),
    ("M73", 5.0),
    ("M75", 7.0),
    ("F51", 14.0),
    ("F52", 9.0),
    ("L72", 10.0),
    ("K70", 4.0),
    ("C39", 3.0),
    ("E47", 4.0),
    ("H62", 6.0),
    ("G54", 3.0),
    ("R86", 3.0),
    ("Q84", 1.0),
];

/// Age bands (start, weight): Beijing's 2020 age structure, roughly.
const AGE_BANDS: [(u32, f64); 20] = [
    (0, 4.4),
    (5, 4.6),
    (10, 3.9),
    (15, 3.3),
    (20, 5.2),
    (25, 8.4),
    (30, 10.3),
    (35, 9.6),
    (40, 8.0),
    (45, 7.2),
    (50, 7.4),
    (55, 6.9),
    (60, 5.6),
    (65, 4.9),
    (70, 3.4),
    (75, 2.3),
    (80, 1.7),
    (85, 1.2),
    (90, 0.6),
    (95, 0.2),
];

/// The 24 months covered, `2024-01` … `2025-12`.
pub fn months() -> Vec<String> {
    (0..24)
        .map(|i| format!("{}-{:02}", 2024 + i / 12, i % 12 + 1))
        .collect()
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[(T, f64)]) -> T {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.r#gen::<f64>() * total;
    for (item, w) in items {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller; only for synthetic data, never for noise.
    let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn lognormal(rng: &mut ChaCha8Rng, median: f64, sigma: f64) -> f64 {
    median * (sigma * normal(rng)).exp()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// splitmix64: a bijection on u64, so ids derived from indices are unique.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const USCC_CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const USCC_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// A unified social credit code (GB 32100-2015) with a valid check character.
pub fn uscc(rng: &mut ChaCha8Rng, region: &str) -> String {
    let mut code = String::from("91");
    code.push_str(region);
    for _ in 0..9 {
        code.push(USCC_CHARS[rng.gen_range(0..USCC_CHARS.len())] as char);
    }
    let sum: u32 = code
        .bytes()
        .zip(USCC_WEIGHTS)
        .map(|(b, w)| USCC_CHARS.iter().position(|c| *c == b).unwrap_or(0) as u32 * w)
        .sum();
    let check = (31 - sum % 31) % 31;
    code.push(USCC_CHARS[check as usize] as char);
    code
}

/// Checks a USCC's check character.
pub fn uscc_is_valid(code: &str) -> bool {
    if code.len() != 18 {
        return false;
    }
    let digits: Option<Vec<u32>> = code
        .bytes()
        .map(|b| USCC_CHARS.iter().position(|c| *c == b).map(|p| p as u32))
        .collect();
    let Some(d) = digits else { return false };
    let sum: u32 = d[..17].iter().zip(USCC_WEIGHTS).map(|(a, w)| a * w).sum();
    (31 - sum % 31) % 31 == d[17]
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) -> Result<()> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("parquet.tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let props = WriterProperties::builder()
        .set_created_by("veil generate".to_owned())
        .set_max_row_group_row_count(Some(256 * 1024))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn text(v: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}

/// What was generated.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Residents.
    pub residents: usize,
    /// Social-insurance rows.
    pub insurance_rows: usize,
    /// Outpatient visits.
    pub visits: usize,
    /// Enterprises.
    pub enterprises: usize,
}

/// Writes the example datasets under `out`.
pub fn generate(out: &Path, scale: f64, seed: u64) -> Result<Summary> {
    anyhow::ensure!(
        scale.is_finite() && scale > 0.0,
        "--scale must be a positive number"
    );
    let residents = ((BASE_RESIDENTS * scale).round() as usize).max(100);
    let enterprises = (residents / 10).max(50);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let district_weights: Vec<(usize, f64)> = DISTRICTS
        .iter()
        .enumerate()
        .map(|(i, d)| (i, d.2))
        .collect();
    let month_names = months();

    // geo.districts
    write_parquet(
        &out.join("geo/districts.parquet"),
        vec![
            (
                "code",
                text(DISTRICTS.iter().map(|d| d.0.to_owned()).collect()),
            ),
            (
                "name",
                text(DISTRICTS.iter().map(|d| d.1.to_owned()).collect()),
            ),
            (
                "area_km2",
                Arc::new(Float64Array::from(
                    DISTRICTS.iter().map(|d| d.3).collect::<Vec<_>>(),
                )),
            ),
        ],
    )?;

    // samr.enterprises: business districts are over-represented.
    let business: Vec<(usize, f64)> = DISTRICTS
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                i,
                if matches!(d.1, "海淀区" | "朝阳区" | "东城区" | "西城区") {
                    d.2 * 2.5
                } else {
                    d.2
                },
            )
        })
        .collect();
    let mut e_uscc = Vec::with_capacity(enterprises);
    let mut e_name = Vec::with_capacity(enterprises);
    let mut e_ind = Vec::with_capacity(enterprises);
    let mut e_dist = Vec::with_capacity(enterprises);
    let mut e_cap = Vec::with_capacity(enterprises);
    let mut e_year = Vec::with_capacity(enterprises);
    const WORDS: [&str; 16] = [
        "京华", "中关", "朝晖", "永定", "燕山", "长城", "通达", "顺和", "金泰", "华信", "博远",
        "新元", "汇智", "融科", "卓越", "恒丰",
    ];
    const KINDS: [&str; 8] = [
        "科技",
        "信息技术",
        "商贸",
        "建设工程",
        "文化传媒",
        "咨询服务",
        "物流",
        "餐饮管理",
    ];
    for i in 0..enterprises {
        let d = pick(&mut rng, &business);
        e_uscc.push(uscc(&mut rng, DISTRICTS[d].0));
        e_name.push(format!(
            "北京{}{}{}有限公司",
            WORDS[rng.gen_range(0..WORDS.len())],
            WORDS[(i * 7 + rng.gen_range(0..WORDS.len())) % WORDS.len()],
            KINDS[rng.gen_range(0..KINDS.len())]
        ));
        e_ind.push(pick(&mut rng, &INDUSTRIES).to_owned());
        e_dist.push(DISTRICTS[d].1.to_owned());
        e_cap.push(round2(lognormal(&mut rng, 100.0, 1.4)));
        let recent: f64 = rng.r#gen::<f64>().powf(0.6);
        e_year.push(1990 + (recent * 35.0) as i32);
    }
    // Employers are Zipf-like: a few large ones.
    let employer_weights: Vec<(usize, f64)> = (0..enterprises)
        .map(|i| (i, 1.0 / (i as f64 + 3.0)))
        .collect();

    // pop.residents
    let mut p_id = Vec::with_capacity(residents);
    let mut p_dist = Vec::with_capacity(residents);
    let mut p_dist_idx = Vec::with_capacity(residents);
    let mut p_age = Vec::with_capacity(residents);
    let mut p_gender = Vec::with_capacity(residents);
    let mut p_hukou = Vec::with_capacity(residents);
    for i in 0..residents {
        p_id.push(format!("{:016x}", mix(seed ^ (i as u64))));
        let d = pick(&mut rng, &district_weights);
        p_dist.push(DISTRICTS[d].1.to_owned());
        p_dist_idx.push(d);
        let band = pick(&mut rng, &AGE_BANDS);
        p_age.push((band + rng.gen_range(0..5)) as i32);
        p_gender.push(if rng.gen_bool(0.51) { "男" } else { "女" }.to_owned());
        p_hukou.push(
            if rng.gen_bool(0.62) {
                "本市户籍"
            } else {
                "外省市户籍"
            }
            .to_owned(),
        );
    }

    // hrss.social_insurance: one row per paid month of each employed resident.
    let mut s_pid = Vec::new();
    let mut s_emp = Vec::new();
    let mut s_dist = Vec::new();
    let mut s_month = Vec::new();
    let mut s_wage = Vec::new();
    for i in 0..residents {
        let age = p_age[i];
        if !(18..=64).contains(&age) || !rng.gen_bool(if age < 60 { 0.78 } else { 0.25 }) {
            continue;
        }
        let employer = pick(&mut rng, &employer_weights);
        let start = if rng.gen_bool(0.6) {
            0
        } else {
            rng.gen_range(0..24)
        };
        let end = if rng.gen_bool(0.7) {
            23
        } else {
            rng.gen_range(start..24)
        };
        // Long-tailed wage base; a few are above the policy bound on purpose.
        let base = lognormal(&mut rng, 9_000.0, 0.6).max(6_326.0);
        for (m, month) in month_names.iter().enumerate().take(end + 1).skip(start) {
            s_pid.push(p_id[i].clone());
            s_emp.push(e_uscc[employer].clone());
            s_dist.push(e_dist[employer].clone());
            s_month.push(month.clone());
            let raise = if m >= 12 { 1.045 } else { 1.0 };
            s_wage.push(round2(base * raise));
        }
    }

    // wjw.outpatient_visits: older residents visit more.
    let chapters: Vec<(usize, f64)> = ICD10.iter().enumerate().map(|(i, c)| (i, c.1)).collect();
    let mut v_id = Vec::new();
    let mut v_pid = Vec::new();
    let mut v_dist = Vec::new();
    let mut v_ch = Vec::new();
    let mut v_month = Vec::new();
    let mut v_cost = Vec::new();
    let mut v_text = Vec::new();
    for i in 0..residents {
        let mean = 1.0 + p_age[i] as f64 / 20.0;
        let mut visits = 0;
        while rng.r#gen::<f64>() < mean / (mean + 1.0) && visits < 40 {
            visits += 1;
        }
        for _ in 0..visits {
            let c = pick(&mut rng, &chapters);
            v_id.push(format!("V{:010}", v_id.len() + 1));
            v_pid.push(p_id[i].clone());
            let d = if rng.gen_bool(0.85) {
                p_dist_idx[i]
            } else {
                pick(&mut rng, &district_weights)
            };
            v_dist.push(DISTRICTS[d].1.to_owned());
            v_ch.push(ICD10[c].0.to_owned());
            v_month.push(month_names[rng.gen_range(0..24)].clone());
            v_cost.push(round2(lognormal(&mut rng, 260.0, 1.0)));
            v_text.push(ICD10[c].2.to_owned());
        }
    }

    let summary = Summary {
        residents,
        insurance_rows: s_pid.len(),
        visits: v_id.len(),
        enterprises,
    };
    write_parquet(
        &out.join("samr/enterprises.parquet"),
        vec![
            ("uscc", text(e_uscc)),
            ("name", text(e_name)),
            ("industry_code", text(e_ind)),
            ("district", text(e_dist)),
            ("registered_capital", Arc::new(Float64Array::from(e_cap))),
            ("established_year", Arc::new(Int32Array::from(e_year))),
        ],
    )?;
    write_parquet(
        &out.join("pop/residents.parquet"),
        vec![
            ("person_id", text(p_id)),
            ("district", text(p_dist)),
            ("age", Arc::new(Int32Array::from(p_age))),
            ("gender", text(p_gender)),
            ("hukou_type", text(p_hukou)),
        ],
    )?;
    write_parquet(
        &out.join("hrss/social_insurance.parquet"),
        vec![
            ("person_id", text(s_pid)),
            ("employer_uscc", text(s_emp)),
            ("district", text(s_dist)),
            ("pay_month", text(s_month)),
            ("wage_base", Arc::new(Float64Array::from(s_wage))),
        ],
    )?;
    write_parquet(
        &out.join("wjw/outpatient_visits.parquet"),
        vec![
            ("visit_id", text(v_id)),
            ("patient_id", text(v_pid)),
            ("district", text(v_dist)),
            ("icd10_chapter", text(v_ch)),
            ("visit_month", text(v_month)),
            ("cost", Arc::new(Float64Array::from(v_cost))),
            ("diagnosis_text", text(v_text)),
        ],
    )?;
    fs::write(out.join("MANIFEST"), manifest(scale, seed))?;
    Ok(summary)
}

fn manifest(scale: f64, seed: u64) -> String {
    format!("veil-example generator={GENERATOR_VERSION} scale={scale} seed={seed}\n")
}

/// Whether `dir` already holds this generator's output for `scale`.
pub fn is_current(dir: &Path, scale: f64, seed: u64) -> bool {
    fs::read_to_string(dir.join("MANIFEST")).is_ok_and(|m| m == manifest(scale, seed))
}

/// Generates into `dir` unless it is already current.
pub fn ensure(dir: &Path, scale: f64) -> Result<Option<Summary>> {
    if is_current(dir, scale, DEFAULT_SEED) {
        return Ok(None);
    }
    generate(dir, scale, DEFAULT_SEED).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_usccs_are_valid_and_corruption_is_caught() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..100 {
            let c = uscc(&mut rng, "110108");
            assert!(uscc_is_valid(&c), "{c}");
            let mut bad = c.into_bytes();
            bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
            assert!(!uscc_is_valid(&String::from_utf8(bad).expect("ascii")));
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        generate(a.path(), 0.005, 7).expect("gen");
        generate(b.path(), 0.005, 7).expect("gen");
        for f in [
            "pop/residents.parquet",
            "hrss/social_insurance.parquet",
            "wjw/outpatient_visits.parquet",
            "samr/enterprises.parquet",
            "geo/districts.parquet",
        ] {
            assert_eq!(
                fs::read(a.path().join(f)).expect("read"),
                fs::read(b.path().join(f)).expect("read"),
                "{f}"
            );
        }
    }
}
