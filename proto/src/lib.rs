//! veil's own gRPC API (package `veil.v1`), generated at build time from
//! `proto/veil/v1/*.proto` by protox and tonic-prost-build: no system `protoc`.
//!
//! ```
//! let info = veil_proto::v1::ServerInfo { version: "0.1.0".into(), ..Default::default() };
//! assert_eq!(info.version, "0.1.0");
//! ```

/// Package `veil.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("veil.v1");
}

/// The encoded `FileDescriptorSet` of `veil.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/veil_descriptor.bin"));
