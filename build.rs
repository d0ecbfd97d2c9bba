//! Build script: compiles proto/automm/v1/automm.proto and proto/inference/grpc_service.proto (KServe v2)
//! with protox (pure Rust, no system protoc) and generates the tonic services and prost messages, plus one
//! file descriptor set of both for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/automm/v1/automm.proto");
    println!("cargo:rerun-if-changed=proto/inference/grpc_service.proto");
    let fds = protox::compile(["automm/v1/automm.proto", "inference/grpc_service.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("automm_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
