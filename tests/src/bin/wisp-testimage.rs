//! wisp-testimage OUT.tar [NAME]: writes the busybox OCI image archive the tests, the
//! demo and the benchmarks import (`ctr images import OUT.tar`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(out) = args.get(1) else {
        eprintln!("usage: wisp-testimage OUT.tar [NAME]");
        std::process::exit(2);
    };
    let name = args.get(2).map(String::as_str).unwrap_or(wisp_tests::image::BUSYBOX_IMAGE);
    match wisp_tests::image::build_busybox_image(std::path::Path::new(out), name) {
        Ok(digest) => println!("{name} {digest}"),
        Err(e) => {
            eprintln!("wisp-testimage: {e:#}");
            std::process::exit(1);
        }
    }
}
