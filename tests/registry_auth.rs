//! Registries that require credentials (CNCF distribution 2.8 with htpasswd basic auth, and
//! with the bearer-token flow and a token service): `gkm build` pushes and signs, `gkm pull`,
//! `gkm inspect` (tag resolution), `gkm verify` (signature lookup) and `gkm promote` work
//! with credentials from a docker config file; the agent pulls with them; wrong credentials
//! fail fast with an error naming the registry and the 401.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gkm_testenv::auth_registry::{AuthMode, AuthRegistry, PASSWORD, USER, docker_config};
use gkm_testenv::{Cosign, unique_name};

fn gkm(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out, t0.elapsed())
}

fn ok(what: &str, (out, _): (Output, Duration)) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A small Triton-like cache to build.
fn cache_dir(dir: &Path) -> PathBuf {
    gkm_testenv::fixtures::one_kernel_triton_cache(dir).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Everything a client does against a registry that requires credentials.
async fn exercise(mode: AuthMode) {
    let reg = AuthRegistry::start(mode).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let host = reg.host().to_string();
    let auth = reg.docker_config();
    let wrong = reg.wrong_docker_config();
    let image = format!("{host}/{}:v1", unique_name("auth/kernels"));
    let common = ["--insecure-registry", &host];
    let pw = [("COSIGN_PASSWORD", cosign.password())];
    let key = cosign.key_path();

    // Push and sign.
    let src = cache_dir(work.path());
    let mut args = vec![
        "build",
        path(&src),
        "--kind",
        "triton",
        "-t",
        &image,
        "--registry-auth",
        path(&auth),
    ];
    args.extend(common);
    args.extend(["--sign-key", path(&key)]);
    let pinned = ok("gkm build", gkm(&args, &pw));
    let pinned = pinned.lines().last().unwrap().to_string();
    assert!(pinned.contains("@sha256:"), "{pinned}");

    // Tag resolution, pull by digest, signature lookup.
    let inspect = ok(
        "gkm inspect",
        gkm(
            &[
                "inspect",
                &image,
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                &host,
            ],
            &[],
        ),
    );
    assert!(
        inspect.contains(pinned.rsplit_once('@').unwrap().1),
        "{inspect}"
    );
    let store = work.path().join("store");
    ok(
        "gkm pull",
        gkm(
            &[
                "pull",
                &pinned,
                "--store",
                path(&store),
                "--no-sync",
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                &host,
            ],
            &[],
        ),
    );
    let policy = work.path().join("policy.yaml");
    std::fs::write(
        &policy,
        gkm_testenv::controller::key_policy(&cosign.public_key_pem().unwrap(), &format!("{host}/")),
    )
    .unwrap();
    ok(
        "gkm verify",
        gkm(
            &[
                "verify",
                &image,
                "--policy",
                path(&policy),
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                &host,
            ],
            &[],
        ),
    );

    // Wrong credentials and none: a fast, clear failure naming the registry and the 401.
    for (what, extra) in [
        ("wrong password", vec!["--registry-auth", path(&wrong)]),
        ("no credentials", vec![]),
    ] {
        // A store of its own: the first pull's tree would answer without the registry.
        let store = tempfile::tempdir().unwrap();
        let mut args = vec![
            "pull",
            pinned.as_str(),
            "--store",
            path(store.path()),
            "--no-sync",
            "--insecure-registry",
            &host,
        ];
        args.extend(extra);
        let (out, took) = gkm(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: pulled without the right credentials"
        );
        assert!(
            err.contains(&format!("registry {host} refused")) && err.contains("401 Unauthorized"),
            "{what}: the error must name the registry and the 401: {err}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{what}: took {took:?}: no retry storm"
        );
    }
    push_with_wrong_credentials(&reg, &src);
}

/// `gkm build` pushing with a wrong password: a fast failure naming the 401.
fn push_with_wrong_credentials(reg: &AuthRegistry, src: &Path) {
    let image = format!("{}/{}:v1", reg.host(), unique_name("auth/denied"));
    let (out, took) = gkm(
        &[
            "build",
            path(src),
            "--kind",
            "triton",
            "-t",
            &image,
            "--registry-auth",
            path(&reg.wrong_docker_config()),
            "--insecure-registry",
            reg.host(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pushed with a wrong password");
    assert!(err.contains("401 Unauthorized"), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test]
async fn a_registry_with_basic_auth_works_with_credentials_and_says_401_without() {
    exercise(AuthMode::Basic).await;
}

#[tokio::test]
async fn a_registry_with_token_auth_works_with_credentials_and_says_401_without() {
    exercise(AuthMode::Token).await;
}

/// Promotion between two registries that both require credentials (basic on the incoming
/// one, tokens on the trusted one), with one docker config naming both.
#[tokio::test]
async fn promotion_between_registries_that_require_credentials() {
    let incoming = AuthRegistry::start(AuthMode::Basic).await.unwrap();
    let trusted = AuthRegistry::start(AuthMode::Token).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let auth = work.path().join("docker-config.json");
    std::fs::write(
        &auth,
        docker_config(&[
            (incoming.host(), USER, PASSWORD),
            (trusted.host(), USER, PASSWORD),
        ]),
    )
    .unwrap();
    let repo = unique_name("dev/kernels");
    let image = format!("{}/{repo}:v1", incoming.host());
    let src = cache_dir(work.path());
    let pw = [("COSIGN_PASSWORD", cosign.password())];
    let key = cosign.key_path();
    let pinned = ok(
        "gkm build",
        gkm(
            &[
                "build",
                path(&src),
                "--kind",
                "triton",
                "-t",
                &image,
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                incoming.host(),
                "--sign-key",
                path(&key),
            ],
            &pw,
        ),
    );
    let digest = pinned
        .lines()
        .last()
        .unwrap()
        .rsplit_once('@')
        .unwrap()
        .1
        .to_string();
    let policy = work.path().join("policy.yaml");
    let pem = cosign.public_key_pem().unwrap();
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    std::fs::write(
        &policy,
        format!(
            "authorities:\n  - name: ci\n    key: |\n{indented}trustedRegistries:\n  - {t}/\npromotion:\n  incoming: {i}/dev\n  trusted: {t}/prod\n",
            t = trusted.host(),
            i = incoming.host()
        ),
    )
    .unwrap();
    ok(
        "gkm promote",
        gkm(
            &[
                "promote",
                &image,
                "--digest",
                &digest,
                "--policy",
                path(&policy),
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                incoming.host(),
                "--insecure-registry",
                trusted.host(),
            ],
            &[],
        ),
    );
    let promoted = format!(
        "{}/prod/{}:v1",
        trusted.host(),
        repo.trim_start_matches("dev/")
    );
    ok(
        "gkm verify of the promoted image",
        gkm(
            &[
                "verify",
                &promoted,
                "--policy",
                path(&policy),
                "--registry-auth",
                path(&auth),
                "--insecure-registry",
                trusted.host(),
            ],
            &[],
        ),
    );
}
