//! crates/node/proto/csi.proto must be wire-identical to the CSI specification: every message, field
//! (name, number, type, label, oneof), enum value and rpc it declares is compared with the
//! upstream csi.proto, fetched through the Go module proxy. A changed field number would
//! break kubelet silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

const SPEC_MODULE: &str = "github.com/container-storage-interface/spec";
const SPEC_VERSION: &str = "v1.12.0";

/// Compiles `file` (in `dir`) into its descriptor.
fn descriptor(dir: &Path, file: &str) -> prost_types::FileDescriptorProto {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(protoc_bin_vendored::protoc_bin_path().unwrap())
        .arg(format!("--descriptor_set_out={}", out.path().display()))
        .arg("-I")
        .arg(dir)
        .arg("-I")
        .arg(protoc_bin_vendored::include_path().unwrap())
        .arg(file)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "protoc failed on {}",
        dir.join(file).display()
    );
    let set = FileDescriptorSet::decode(&std::fs::read(out.path()).unwrap()[..]).unwrap();
    set.file.into_iter().find(|f| f.name() == file).unwrap()
}

/// The upstream csi.proto, through `go mod download` (the Go module proxy).
fn upstream_dir() -> PathBuf {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("go.mod"),
        "module gkm.local/csispec\n\ngo 1.22\n",
    )
    .unwrap();
    let out = Command::new("go")
        .args([
            "mod",
            "download",
            "-json",
            &format!("{SPEC_MODULE}@{SPEC_VERSION}"),
        ])
        .current_dir(tmp.path())
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("running `go` (needed to fetch the upstream CSI spec)");
    assert!(
        out.status.success(),
        "go mod download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(info["Dir"].as_str().expect("go mod download prints Dir"))
}

/// Every difference between what `ours` declares and what `theirs` has, in words.
fn compare(
    ours: &prost_types::FileDescriptorProto,
    theirs: &prost_types::FileDescriptorProto,
) -> Vec<String> {
    let mut diffs = Vec::new();
    if ours.package() != theirs.package() {
        diffs.push(format!(
            "package {} != {}",
            ours.package(),
            theirs.package()
        ));
    }
    let mut their_msgs = BTreeMap::new();
    let mut their_enums = BTreeMap::new();
    for m in &theirs.message_type {
        index(m, "", &mut their_msgs, &mut their_enums);
    }
    for e in &theirs.enum_type {
        their_enums.insert(e.name().to_string(), e.clone());
    }
    let mut our_msgs = BTreeMap::new();
    let mut our_enums = BTreeMap::new();
    for m in &ours.message_type {
        index(m, "", &mut our_msgs, &mut our_enums);
    }
    for e in &ours.enum_type {
        our_enums.insert(e.name().to_string(), e.clone());
    }
    for (name, m) in &our_msgs {
        let Some(t) = their_msgs.get(name) else {
            diffs.push(format!("message {name} is not in the spec"));
            continue;
        };
        for f in &m.field {
            let Some(tf) = t.field.iter().find(|x| x.name() == f.name()) else {
                diffs.push(format!("{name}.{} is not in the spec", f.name()));
                continue;
            };
            let oneof = |d: &DescriptorProto, i: Option<i32>| {
                i.map(|i| d.oneof_decl[i as usize].name().to_string())
            };
            let ours = (
                f.number(),
                f.r#type(),
                f.label(),
                f.type_name(),
                oneof(m, f.oneof_index),
            );
            let spec = (
                tf.number(),
                tf.r#type(),
                tf.label(),
                tf.type_name(),
                oneof(t, tf.oneof_index),
            );
            if ours != spec {
                diffs.push(format!("{name}.{}: ours {ours:?}, spec {spec:?}", f.name()));
            }
        }
        // Fields of the spec we leave out are fine only if they are not on the wire for
        // what we serve; every message we serve must carry all its fields.
        for tf in &t.field {
            if !m.field.iter().any(|f| f.name() == tf.name()) {
                diffs.push(format!(
                    "{name}.{} (field {}) is missing",
                    tf.name(),
                    tf.number()
                ));
            }
        }
    }
    for (name, e) in &our_enums {
        let Some(t) = their_enums.get(name) else {
            diffs.push(format!("enum {name} is not in the spec"));
            continue;
        };
        let values = |e: &EnumDescriptorProto| {
            e.value
                .iter()
                .map(|v| (v.name().to_string(), v.number()))
                .collect::<Vec<_>>()
        };
        if values(e) != values(t) {
            diffs.push(format!(
                "enum {name}: ours {:?}, spec {:?}",
                values(e),
                values(t)
            ));
        }
    }
    for s in &ours.service {
        let Some(ts) = theirs.service.iter().find(|x| x.name() == s.name()) else {
            diffs.push(format!("service {} is not in the spec", s.name()));
            continue;
        };
        for m in &s.method {
            match ts.method.iter().find(|x| x.name() == m.name()) {
                None => diffs.push(format!("rpc {}.{} is not in the spec", s.name(), m.name())),
                Some(tm) => {
                    let sig = |x: &prost_types::MethodDescriptorProto| {
                        (
                            x.input_type().to_string(),
                            x.output_type().to_string(),
                            x.client_streaming(),
                            x.server_streaming(),
                        )
                    };
                    if sig(m) != sig(tm) {
                        diffs.push(format!(
                            "rpc {}.{}: ours {:?}, spec {:?}",
                            s.name(),
                            m.name(),
                            sig(m),
                            sig(tm)
                        ));
                    }
                }
            }
        }
    }
    diffs
}

fn index(
    m: &DescriptorProto,
    prefix: &str,
    msgs: &mut BTreeMap<String, DescriptorProto>,
    enums: &mut BTreeMap<String, EnumDescriptorProto>,
) {
    let name = format!("{prefix}{}", m.name());
    for e in &m.enum_type {
        enums.insert(format!("{name}.{}", e.name()), e.clone());
    }
    for n in &m.nested_type {
        // Map entries are generated types; they are compared through their map field.
        if !n.options.as_ref().is_some_and(|o| o.map_entry()) {
            index(n, &format!("{name}."), msgs, enums);
        }
    }
    msgs.insert(name, m.clone());
}

fn our_proto_dir() -> PathBuf {
    gkm_testenv::workspace_root().join("crates/node/proto")
}

#[test]
fn our_csi_proto_is_wire_identical_to_the_spec() {
    let ours = descriptor(&our_proto_dir(), "csi.proto");
    let theirs = descriptor(&upstream_dir(), "csi.proto");
    let diffs = compare(&ours, &theirs);
    assert!(
        diffs.is_empty(),
        "proto/csi.proto differs from CSI {SPEC_VERSION}:\n{}",
        diffs.join("\n")
    );
    // The comparison covered what we serve.
    assert!(
        ours.message_type
            .iter()
            .any(|m| m.name() == "NodePublishVolumeRequest")
    );
}

#[test]
fn a_changed_field_number_is_caught() {
    let ours = descriptor(&our_proto_dir(), "csi.proto");
    let text = std::fs::read_to_string(our_proto_dir().join("csi.proto")).unwrap();
    let broken = text.replace("string target_path = 4;", "string target_path = 9;");
    assert_ne!(broken, text);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("csi.proto"), broken).unwrap();
    let diffs = compare(&descriptor(dir.path(), "csi.proto"), &ours);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(
        diffs[0].contains("NodePublishVolumeRequest.target_path"),
        "{diffs:?}"
    );
}
