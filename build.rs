//! Generates the wire types from `proto/` with the protoc binary that ships as a crate, so no
//! system protoc is needed. The protoc path is also handed to the tests, which generate the
//! Python client from the same schema.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    println!("cargo:rustc-env=SEALGATE_PROTOC={}", protoc.display());
    println!("cargo:rerun-if-changed=proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.compile_protos(
        &[
            "proto/sealgate/v1/sealgate.proto",
            "proto/sealgate/terminal/v1/terminal.proto",
            "proto/sealgate/hq/v1/hq.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
