//! Private CAs an upstream's (or a peer replica's) client trusts besides the system roots.

/// Adds every certificate of the PEM bundle at `path` to a client's trusted roots (an
/// upstream's or a peer replica's private CA). The error names the file.
pub fn trust_pem_file(
    mut builder: reqwest::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::ClientBuilder, String> {
    let pem = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|err| format!("{}: {err}", path.display()))?;
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}
