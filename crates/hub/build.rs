//! Compiles the hub's API (`shapeblock.hub.v1`, beside the agent protocol in
//! `crates/proto/proto/`) with protox, so the build needs no system `protoc`. It is generated
//! here, not in `shapeblock-proto`: the agent has no use for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../proto/proto";
    let proto = "../proto/proto/shapeblock/hub/v1/hub.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
