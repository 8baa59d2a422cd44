//! Generates the protobuf messages and ttrpc services from `proto/` into OUT_DIR.
//! The generated files start with inner attributes and doc comments that `include!`
//! cannot take, so those lines are stripped.

use std::fs;
use std::path::Path;

fn main() {
    let protos = ["proto/vmm.proto", "proto/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(protos)
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize { gen_mod: false, ..Default::default() })
        .run()
        .expect("ttrpc code generation failed");
    for entry in fs::read_dir(&out).expect("read OUT_DIR") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            strip_inner_attributes(&path);
        }
    }
}

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path).expect("read generated file");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("#!") || t.starts_with("//!"))
        })
        .collect();
    fs::write(path, kept.join("\n")).expect("write generated file");
}
