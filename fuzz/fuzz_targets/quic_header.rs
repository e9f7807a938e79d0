#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz_targets::quic_header(data));
