//! Prints a checksum of each benchmarked method's output bits, so that an
//! optimisation can be checked to leave results bit-identical.
//!
//! `cargo run --release -p tensormerge-benches --bin bench-checksum [numel]`

use tensormerge_benches::{CASES, Inputs};

fn main() {
    let numel = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3_000_017usize);
    let inputs = Inputs::new(numel, 3);
    let mut out = vec![0.0f32; numel];
    for case in CASES {
        case.run(&inputs, &mut out).expect("merge");
        // FNV-1a over the output bit patterns
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for v in &out {
            for b in v.to_bits().to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        println!("{:<20} {numel} {h:016x}", case.label);
    }
}
