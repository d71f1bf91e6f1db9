//! Any bytes: the policy loader answers with a policy or with diagnostics,
//! and rendering the diagnostics never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = veil_policy::Policy::parse(&text, "fuzz.toml") {
        let _ = e.render(false);
    }
});
