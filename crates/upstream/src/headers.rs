//! Headers: reading one as text, and the `Accept` sent upstream for manifests.

use http::HeaderMap;
use regcache_oci::MediaType;

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The `Accept` value sent upstream: the client's when it names manifest types, otherwise
/// every manifest type. A bare `*/*` must not be forwarded: Distribution answers it by
/// down-converting to schema1, or with 404 for OCI content.
pub(crate) fn accept_header(client_accept: &[String]) -> String {
    let names_manifest_types = client_accept
        .iter()
        .flat_map(|value| value.split(','))
        .filter_map(|item| item.split(';').next())
        .any(|item| MediaType::ALL_MANIFESTS.contains(&item.trim()));
    if names_manifest_types {
        client_accept.join(", ")
    } else {
        MediaType::ALL_MANIFESTS.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_is_forwarded_only_when_it_names_manifest_types() {
        let all = MediaType::ALL_MANIFESTS.join(", ");
        assert_eq!(accept_header(&[]), all);
        assert_eq!(accept_header(&["*/*".to_owned()]), all);
        assert_eq!(accept_header(&["application/json".to_owned()]), all);
        let docker = "application/vnd.docker.distribution.manifest.v2+json; q=0.9".to_owned();
        assert_eq!(
            accept_header(&[docker.clone(), "*/*".to_owned()]),
            format!("{docker}, */*")
        );
    }
}
