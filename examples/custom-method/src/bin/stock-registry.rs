//! `stock-registry`: links only the stock set (`tensormerge::builtin`), as the
//! `tensormerge` binary does, and prints the registered method names, one per
//! line. The third-party `example_median` is not among them.

fn main() {
    for name in tensormerge::builtin::registry().names() {
        println!("{name}");
    }
}
