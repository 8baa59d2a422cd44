//! Prints the configuration reference (Markdown) that README.md embeds:
//! `cargo run -q -p wisp-config --example reference`.
fn main() {
    print!("{}", wisp_config::reference_markdown());
}
