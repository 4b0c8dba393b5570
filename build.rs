//! Compiles proto/ with a pure-Rust protobuf compiler (protox): no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tandem/v1/coordinator.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
