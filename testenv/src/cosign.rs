//! Real cosign: an offline key pair, signatures in the tag format (`sha256-<hex>.sig`) or
//! as a Sigstore bundle, and `cosign verify` as an independent check.

use std::path::PathBuf;

use tokio::process::Command;

use crate::Error;
use crate::process;
use crate::tools::{self, Tool};

/// A cosign key pair in its own directory, and the cosign binary to use it with.
pub struct Cosign {
    bin: PathBuf,
    dir: PathBuf,
    password: String,
}

impl Cosign {
    /// Generates a new key pair (`cosign generate-key-pair`, password-protected).
    pub async fn generate() -> Result<Self, Error> {
        let this = Self {
            bin: tools::locate(Tool::Cosign)?,
            dir: process::work_dir("cosign")?,
            password: "gkm-testenv".into(),
        };
        this.run(&["generate-key-pair"]).await?;
        Ok(this)
    }

    /// Path of the encrypted private key (`cosign.key`).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("cosign.key")
    }

    /// Path of the public key (`cosign.pub`, PEM).
    pub fn public_key_path(&self) -> PathBuf {
        self.dir.join("cosign.pub")
    }

    pub fn public_key_pem(&self) -> Result<String, Error> {
        std::fs::read_to_string(self.public_key_path())
            .map_err(|e| Error::io("reading cosign.pub", e))
    }

    /// Signs `image` (`repo@sha256:…`) in cosign's tag format, fully offline.
    pub async fn sign(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--new-bundle-format=false",
            "--allow-http-registry",
            "-y",
            image,
        ])
        .await
    }

    /// Signs `image` with a Sigstore bundle, attached as an OCI 1.1 referrer (or under the
    /// fallback tag where the registry has no referrers API), fully offline.
    pub async fn sign_bundle(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--new-bundle-format=true",
            "--allow-http-registry",
            "-y",
            image,
        ])
        .await
    }

    /// `cosign verify --key cosign.pub`; Ok with cosign's output when it verifies.
    pub async fn verify(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "verify",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            image,
        ])
        .await
    }

    /// Runs cosign in the key's directory, with a private HOME so it neither reads nor
    /// writes the user's sigstore state.
    pub async fn run(&self, args: &[&str]) -> Result<String, Error> {
        let out = Command::new(&self.bin)
            .args(args)
            .current_dir(&self.dir)
            .env("COSIGN_PASSWORD", &self.password)
            .env("HOME", &self.dir)
            .env("TUF_ROOT", self.dir.join("tuf"))
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io(format!("running {}", self.bin.display()), e))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(Error::Command {
                command: format!("cosign {}", args.join(" ")),
                status: out.status.to_string(),
                output: text,
            })
        }
    }
}

impl Drop for Cosign {
    fn drop(&mut self) {
        process::remove_work_dir(&self.dir);
    }
}
