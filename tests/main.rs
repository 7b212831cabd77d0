//! The end-to-end tests: one test binary, so that its tests share the two cores without the
//! gaps of ~20 binaries run one after another, and the dependency tree is linked once.
//! Run one file's tests with `cargo test --test e2e <file>::`, e.g. `cargo test --test e2e
//! cluster::`. Each module is a file of this directory; `common` is their shared harness.

mod common;

mod activation;
mod airgap;
mod budgets;
mod clients;
mod cluster;
mod deploy;
mod docker;
mod faults;
mod freshness;
mod h2budget;
mod harness_smoke;
mod hostile;
mod index_crash;
mod monitoring;
mod policy;
mod pull;
mod s3;
mod security;
mod storage;
mod tag_lists;
