//! How the daemon reads and writes YAML (serde-saphyr): one set of options for the discovery
//! file, policies and `ctl convert`.

/// How the daemon reads YAML: straight into typed values, as it streams (serde-saphyr), under
/// YAML 1.2's core schema: `yes`, `on` or `y` are text, not booleans, and plain numbers whose
/// meaning differs between YAML's versions (leading zeros, underscores) stay the text they
/// were written as, so a field that wants a number refuses them. The budget bounds
/// what aliases may expand to, and lets a discovery file be as large as its mesh (up to 1 GiB).
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(1 << 30),
            max_events: usize::MAX,
            max_nodes: usize::MAX,
            max_total_scalar_bytes: usize::MAX,
        },
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        strict_booleans: true,
    }
}

/// `v` as YAML, every string a plain or quoted scalar (no folded blocks: a long pattern or
/// description stays on its line).
pub fn to_string<T: serde::Serialize>(v: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string_with_options(
        v,
        serde_saphyr::ser_options! { prefer_block_scalars: false },
    )
}
