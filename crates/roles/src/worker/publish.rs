//! Publishing a verified binary: sign it, write its checksum and signed provenance, store
//! all of it under `builds/<key[0:2]>/<key>/<attempt>/`, and say what was stored (the
//! `succeeded` event is appended by the caller only after every file is stored).

use std::path::Path;

use anyhow::Context;
use cbs_domain::artifact::{checksum_of, signature_of, ArtifactPath, PROVENANCE};
use cbs_domain::buildinfo::{BuildInfo, ModuleInfo};
use cbs_events::Artifact;
use cbs_projections::BuildState;
use cbs_signing::provenance::{self, Module};
use cbs_signing::{checksum_file, modules_hash, Signer, TrustedComment};
use cbs_storage::Storage;
use chrono::{DateTime, Utc};

/// Storage and the signing key of a worker.
#[derive(Debug)]
pub struct Publisher {
    pub storage: Storage,
    pub signer: std::sync::Arc<Signer>,
}

impl Publisher {
    /// Loads the signing key and sets up storage; an error names what is wrong.
    pub async fn from_config(config: &cbs_config::Config) -> anyhow::Result<Publisher> {
        let s = &config.signing;
        let password = s.password.as_ref().map(|p| p.expose().as_str());
        let key_file = s.key_file.clone();
        let pw = password.map(str::to_owned);
        // Decrypting an scrypt-protected key takes a moment: off the async threads.
        let signer = tokio::task::spawn_blocking(move || Signer::load(&key_file, pw.as_deref()))
            .await
            .context("loading the signing key")??;
        key_file_warnings(&s.key_file, password.is_some_and(|p| !p.is_empty()));
        let storage = Storage::connect(&config.storage)
            .await
            .context("artifact storage")?;
        Ok(Publisher {
            storage,
            signer: std::sync::Arc::new(signer),
        })
    }
}

/// Warns when the secret key file is readable by other users, or not encrypted.
fn key_file_warnings(path: &Path, encrypted: bool) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the signing key file is readable or writable by other users; chmod 600 it");
        }
    }
    if !encrypted {
        tracing::warn!(path = %path.display(), "the signing key is not encrypted; anyone who can read the file can sign as this server (set signing.password for an encrypted key)");
    }
}

/// What a publication needs to know.
#[derive(Debug)]
pub struct Input<'a> {
    pub build: &'a BuildState,
    pub binary: &'a Path,
    /// `caddy` or `caddy.exe`.
    pub name: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    pub info: &'a BuildInfo,
    /// Builder image reference and id.
    pub builder: (String, String),
    pub worker: &'a str,
    pub started: DateTime<Utc>,
}

fn module(m: &ModuleInfo) -> Module {
    Module {
        path: m.path.clone(),
        version: m.version.clone(),
        sum: m.sum.clone(),
        replaced_by: m.replace.as_deref().map(|r| Box::new(module(r))),
    }
}

/// The trusted comment's module-list hash for a binary's build information: its `dep`
/// lines, with replacements (`path@version => new@version`).
pub fn binary_modules_hash(info: &BuildInfo) -> String {
    let lines: Vec<String> = info
        .deps
        .iter()
        .map(|d| match &d.replace {
            Some(r) => format!("{}@{} => {}@{}", d.path, d.version, r.path, r.version),
            None => format!("{}@{}", d.path, d.version),
        })
        .collect();
    modules_hash(lines.iter().map(String::as_str))
}

/// The binary's replacements as the trusted comment states them (`old=>new@version`).
pub fn binary_replacements(info: &BuildInfo) -> Vec<String> {
    let mut out: Vec<String> = info
        .deps
        .iter()
        .filter_map(|d| {
            let r = d.replace.as_ref()?;
            Some(format!("{}=>{}@{}", d.path, r.path, r.version))
        })
        .collect();
    out.sort();
    out
}

/// Signs a file in a blocking thread (it hashes the whole file).
async fn sign_file(
    signer: &std::sync::Arc<Signer>,
    path: &Path,
    trusted: String,
) -> anyhow::Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let signer = signer.clone();
    tokio::task::spawn_blocking(move || {
        signer
            .sign(std::io::BufReader::with_capacity(1 << 20, file), &trusted)
            .map_err(anyhow::Error::from)
    })
    .await?
}

/// The provenance statement of the verified binary `i` for the run `invocation` (signed
/// with the server's key, the signature's trusted comment naming `file`, the statement's
/// stored name): the statement's bytes and its minisign signature. A second builder that
/// reproduced a binary signs its own statement about the same binary with this too.
pub fn signed_statement(
    p: &Publisher,
    i: &Input<'_>,
    invocation: &str,
    file: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<(Vec<u8>, String)> {
    let b = i.build;
    let modules: Vec<Module> = i.info.deps.iter().map(module).collect();
    let statement = provenance::statement(&provenance::Input {
        file_name: i.name,
        sha256: i.sha256,
        build_key: b.key.as_str(),
        invocation_id: invocation,
        request: serde_json::to_value(&b.request).context("request as JSON")?,
        go_version: &i.info.go_version,
        modules: &modules,
        builder_image_id: &i.builder.1,
        builder_image: &i.builder.0,
        worker_id: i.worker,
        server_version: env!("CARGO_PKG_VERSION"),
        started: i.started,
        finished: now,
    });
    let mut statement = serde_json::to_vec_pretty(&statement).context("provenance")?;
    statement.push(b'\n');
    let statement_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&statement))
    };
    let caddy_version = b.request.caddy_version().to_string();
    // A few kilobytes: signed in place.
    let signature = p.signer.sign(
        &statement[..],
        &TrustedComment {
            timestamp: now.timestamp(),
            build_key: b.key.as_str(),
            caddy_version: &caddy_version,
            modules_sha256: &binary_modules_hash(i.info),
            replacements: &binary_replacements(i.info),
            file,
            sha256: &statement_sha,
        }
        .to_string(),
    )?;
    Ok((statement, signature))
}

/// Signs and stores the binary and its companions; returns the artifact the `succeeded`
/// event records. Any error leaves the build unpublished (files of this attempt may remain
/// in storage, never served; the janitor's retention removes them).
pub async fn publish(p: &Publisher, i: Input<'_>) -> anyhow::Result<Artifact> {
    let b = i.build;
    let place = ArtifactPath {
        key: &b.key,
        attempt: b.attempt,
    };
    let now = Utc::now();
    let modules_sha = binary_modules_hash(i.info);
    let replacements = binary_replacements(i.info);
    let caddy_version = b.request.caddy_version().to_string();
    let trusted = TrustedComment {
        timestamp: now.timestamp(),
        build_key: b.key.as_str(),
        caddy_version: &caddy_version,
        modules_sha256: &modules_sha,
        replacements: &replacements,
        file: i.name,
        sha256: i.sha256,
    }
    .to_string();
    let signature = sign_file(&p.signer, i.binary, trusted).await?;
    let invocation = format!("{}/{}", b.key, b.attempt);
    let (statement, statement_sig) = signed_statement(p, &i, &invocation, PROVENANCE, now)?;

    let sig_name = signature_of(i.name);
    let sum_name = checksum_of(i.name);
    let prov_sig_name = signature_of(PROVENANCE);
    let stored = p.storage.put_file(&place.file(i.name), i.binary).await?;
    anyhow::ensure!(
        stored == i.size,
        "stored {stored} bytes of a {}-byte binary",
        i.size
    );
    for (name, body) in [
        (&sig_name, signature.into_bytes()),
        (&sum_name, checksum_file(i.sha256, i.name).into_bytes()),
        (&prov_sig_name, statement_sig.into_bytes()),
        (&PROVENANCE.to_owned(), statement),
    ] {
        p.storage.put_bytes(&place.file(name), body.into()).await?;
    }
    Ok(Artifact {
        location: place.location(),
        size: i.size,
        sha256: i.sha256.to_owned(),
        files: vec![
            i.name.to_owned(),
            sig_name,
            sum_name,
            PROVENANCE.to_owned(),
            prov_sig_name,
        ],
        modules_sha256: Some(modules_sha),
    })
}
