//! The CI load test (being written).
fn main() {}
