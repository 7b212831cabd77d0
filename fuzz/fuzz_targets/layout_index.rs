#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regcache::fuzzing::layout_index(data));
