//! The README's configuration reference is generated from the key table; this keeps it
//! from drifting. Regenerate with `cargo run -q -p wisp-config --example reference`.

#[test]
fn readme_embeds_the_current_reference() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    assert!(
        readme.contains(&wisp_config::reference_markdown()),
        "README.md's configuration reference is stale: paste the output of `cargo run -q -p wisp-config --example reference`"
    );
}
