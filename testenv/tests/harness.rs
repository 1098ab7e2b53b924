//! The harness is real: these start the real programs and check what they say.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, Target};
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{Cluster, ClusterOptions, Cosign, Error, Registry, shared_registry, unique_name};

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count only processes that still run.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn killing_the_owner_leaves_no_server_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gkm-testenv"))
        .arg("up")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&line).expect("gkm-testenv printed its JSON line");
    let pids: Vec<u32> = info["pids"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(
        pids.iter().all(|&p| alive(p)),
        "servers run while their owner lives"
    );

    // SIGKILL: no destructor, no atexit; only the kernel's parent-death signal is left.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "still running after the owner was killed: {left:?}"
    );
}

#[test]
fn a_missing_tool_is_named() {
    let empty = tempfile::tempdir().unwrap();
    let err = tools::locate_in(Tool::KubeApiserver, empty.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::ToolMissing {
                tool: "kube-apiserver",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("kube-apiserver") && msg.contains("install-tools.sh"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_port_clash_is_named_not_hung() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();

    let start = Instant::now();
    let err = Cluster::start_with(ClusterOptions {
        apiserver_port: Some(port),
        ..Default::default()
    })
    .await
    .err()
    .expect("a taken apiserver port must fail the start");
    assert!(
        matches!(&err, Error::PortInUse { port: p, what } if *p == port && what.contains("kube-apiserver")),
        "{err}"
    );

    let err = Registry::start_on(Some(port))
        .await
        .err()
        .expect("a taken registry port must fail");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "failing took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_signed_mcv_image_verifies_with_real_cosign() {
    let registry = shared_registry();
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("abc123")).unwrap();
    std::fs::write(
        cache.path().join("abc123/kernel.cubin"),
        b"\x7fELF fake cubin",
    )
    .unwrap();
    std::fs::write(
        cache.path().join("abc123/kernel.json"),
        br#"{"name":"add_kernel"}"#,
    )
    .unwrap();
    let targets = [Target::new("cuda", "90", 32)];
    let image =
        ImageBuilder::mcv(CacheKind::Triton, cache.path(), &targets, Compression::Gzip).unwrap();
    assert_eq!(image.labels["cache.triton.image/entry-count"], "2");
    assert_eq!(
        image.labels["cache.triton.image/summary"],
        r#"{"targets":[{"arch":"90","backend":"cuda","warp_size":32}]}"#
    );
    let repo = unique_name("harness/signed");
    let pushed = image.push(registry, &repo, Some("v1")).await.unwrap();

    let cosign = Cosign::generate().await.unwrap();
    // Unsigned: cosign itself says no.
    let err = cosign.verify(&pushed.by_digest()).await.unwrap_err();
    assert!(
        err.to_string().contains("no signatures found")
            || err.to_string().contains("no matching signatures"),
        "{err}"
    );

    cosign.sign(&pushed.by_digest()).await.unwrap();
    let out = cosign.verify(&pushed.by_tag()).await.unwrap();
    assert!(
        out.contains(&pushed.digest),
        "cosign verify names the digest: {out}"
    );

    // The signature is where the tag format says: sha256-<hex>.sig in the same repository.
    let sig_tag = pushed.digest.replace(':', "-") + ".sig";
    let url = format!("{}/v2/{repo}/manifests/{sig_tag}", registry.base_url());
    let resp = gkm_testenv::http_builder()
        .build()
        .unwrap()
        .get(url)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "signature manifest under {sig_tag}"
    );

    // A second key does not verify the first key's signature.
    let other = Cosign::generate().await.unwrap();
    assert!(other.verify(&pushed.by_digest()).await.is_err());
}
