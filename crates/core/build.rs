// Migrations are embedded from ../../sql; rebuild when a file there is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=../../sql");
}
