//! `deploy/` checked offline: every Kubernetes manifest validates against the Kubernetes API
//! schemas (`kubernetes-validate --strict`, from PyPI), the ServiceMonitors against the
//! prometheus-operator schema (`@kubernetes-models/prometheus-operator` from npm, installed in
//! `deploy/validate` by `.ci/run`), probes point at regcache's probe routes, and the
//! `config.toml` inside each ConfigMap (and the compose example's) passes
//! `regcache check-config` with the environment and mounted files the pod would have.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `deploy/kubernetes/*.yaml`, sorted.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let value = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).expect("YAML as JSON")
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The documents of one kind in a file.
fn of_kind(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    documents(path)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    common::require_tool("kubernetes-validate");
    let files = manifest_files();
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    assert!(!report.contains("ERROR"), "{report}");
    // Only the CRD it has no schema for is passed over (checked by the next test).
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(line.contains("kind ServiceMonitor"), "{line}");
    }
    let kinds: Vec<String> = files
        .iter()
        .flat_map(|f| documents(f))
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in [
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} in deploy/kubernetes"
        );
    }
}

#[test]
fn service_monitors_validate_against_the_prometheus_operator_schema() {
    common::require_tool("node");
    let validate = repo().join("deploy/validate");
    assert!(
        validate
            .join("node_modules/@kubernetes-models/prometheus-operator")
            .is_dir(),
        "deploy/validate has no node_modules: run `npm ci --prefix deploy/validate` (see .ci/run)"
    );
    let script = validate.join("servicemonitor.mjs");
    let check = |monitor: &serde_json::Value| {
        Command::new("node")
            .arg(&script)
            .arg(monitor.to_string())
            .output()
            .expect("run node")
    };
    let mut checked = 0;
    for file in manifest_files() {
        for monitor in of_kind(&file, "ServiceMonitor") {
            let output = check(&monitor);
            assert!(
                output.status.success(),
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "one ServiceMonitor per layout");
    // The validator refuses what the operator would.
    let mut broken = of_kind(
        &repo().join("deploy/kubernetes/single.yaml"),
        "ServiceMonitor",
    )
    .pop()
    .expect("a ServiceMonitor");
    broken["spec"]["endpoints"][0]["port"] = serde_json::json!(9090);
    assert!(!check(&broken).status.success());
}

#[test]
fn probes_use_the_probe_routes_on_a_declared_port() {
    for file in manifest_files() {
        for deployment in of_kind(&file, "Deployment") {
            for container in deployment["spec"]["template"]["spec"]["containers"]
                .as_array()
                .expect("containers")
            {
                let ports: Vec<&str> = container["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
                {
                    let get = &container[probe]["httpGet"];
                    assert_eq!(get["path"], path, "{} {probe}", file.display());
                    let port = get["port"].as_str().expect("a named port");
                    assert!(
                        ports.contains(&port),
                        "{} {probe} port {port}",
                        file.display()
                    );
                }
            }
        }
    }
}

/// `regcache check-config -c <file>` with `env`; (success, stdout + stderr).
fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["check-config", "-c"])
        .arg(&path)
        .env_remove("POD_IP")
        .env_remove("HOSTNAME")
        .envs(env.iter().copied())
        .output()
        .expect("run regcache check-config");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The `config.toml` of the ConfigMap in a manifest file.
fn config_map_toml(file: &str) -> String {
    let maps = of_kind(&repo().join("deploy/kubernetes").join(file), "ConfigMap");
    maps[0]["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap")
        .to_owned()
}

#[test]
fn config_maps_pass_check_config() {
    let (ok, output) = check_config(&config_map_toml("single.yaml"), &[]);
    assert!(ok, "single.yaml: {output}");
    // What check-config prints is a config regcache accepts back, and says so.
    assert!(output.contains("\n# config OK: "), "{output}");
    let (ok, again) = check_config(&output, &[]);
    assert!(ok, "check-config's own output: {again}");

    // The replicated one, with the pod's environment and its mounted cluster secret.
    let secret_value = of_kind(&repo().join("deploy/kubernetes/replicated.yaml"), "Secret")[0]
        ["stringData"]["cluster-secret"]
        .as_str()
        .expect("cluster-secret in the Secret")
        .to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, &secret_value).expect("write secret");
    let text = config_map_toml("replicated.yaml").replace(
        "/etc/regcache/cluster/secret",
        &secret.display().to_string(),
    );
    let (ok, output) = check_config(&text, &[("POD_IP", "10.0.0.7")]);
    assert!(ok, "replicated.yaml: {output}");
    assert!(output.contains("\"http://10.0.0.7:5000\""), "{output}");
    assert!(
        output.contains("regcache-peers.regcache.svc.cluster.local"),
        "{output}"
    );
    // Without the downward API's POD_IP the pod refuses to start, naming the key.
    let (ok, output) = check_config(&text, &[]);
    assert!(!ok);
    assert!(
        output.contains("cluster.self") && output.contains("POD_IP"),
        "{output}"
    );

    // The compose example: one file for both replicas, told apart by their hostnames.
    let compose = repo().join("deploy/compose");
    let text = std::fs::read_to_string(compose.join("regcache.toml"))
        .expect("regcache.toml")
        .replace(
            "/etc/regcache/cluster-secret",
            &compose.join("cluster-secret").display().to_string(),
        );
    let (ok, output) = check_config(&text, &[("HOSTNAME", "regcache-b")]);
    assert!(ok, "compose regcache.toml: {output}");
    assert!(output.contains("\"http://regcache-b:5000\""), "{output}");
}

#[test]
fn the_compose_pair_names_each_other_and_its_files_exist() {
    let compose = repo().join("deploy/compose");
    let file = documents(&compose.join("docker-compose.yml")).remove(0);
    let config: toml::Table = std::fs::read_to_string(compose.join("regcache.toml"))
        .expect("regcache.toml")
        .parse()
        .expect("TOML");
    let peers = config["cluster"]["peers"].as_array().expect("peers");
    let services = file["services"].as_object().expect("services");
    let mut replicas = 0;
    for (name, service) in services.iter().filter(|(n, _)| n.starts_with("regcache")) {
        let hostname = service["hostname"].as_str().expect("hostname");
        let id = format!("http://{hostname}:5000");
        assert!(
            peers.iter().any(|p| p.as_str() == Some(&id)),
            "{name}: {id} not in peers"
        );
        for volume in service["volumes"].as_array().expect("volumes") {
            let source = volume
                .as_str()
                .and_then(|v| v.split(':').next())
                .unwrap_or("");
            if let Some(path) = source.strip_prefix("./") {
                assert!(compose.join(path).is_file(), "{name}: {source}");
            }
        }
        replicas += 1;
    }
    assert_eq!(replicas, 2);
    let bucket = config["storage"]["s3"]["bucket"].as_str().expect("bucket");
    let command = services["seaweedfs"]["command"].to_string();
    assert!(command.contains(&format!("-bucket={bucket}")), "{command}");
}

/// The image name an operator builds with the README's command: what every deploy file runs.
fn readme_image() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let command = readme
        .lines()
        .find_map(|line| line.split("docker build -f deploy/Dockerfile -t ").nth(1))
        .expect("the README's docker build command");
    command
        .split_whitespace()
        .next()
        .expect("an image name")
        .to_owned()
}

#[test]
fn every_deploy_file_runs_the_image_the_readme_builds_and_the_build_context_leaves_out_targets() {
    let image = readme_image();
    assert!(
        image.contains(':'),
        "the README builds an untagged image: {image}"
    );
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(&format!("-t {image} .")),
        "Dockerfile comment"
    );
    for path in manifest_files() {
        for document in documents(&path) {
            let containers = &document["spec"]["template"]["spec"]["containers"];
            for container in containers.as_array().into_iter().flatten() {
                assert_eq!(
                    container["image"].as_str(),
                    Some(image.as_str()),
                    "{}",
                    path.display()
                );
            }
        }
    }
    let compose = documents(&repo().join("deploy/compose/docker-compose.yml")).remove(0);
    for (name, service) in compose["services"].as_object().expect("services") {
        if name.starts_with("regcache") {
            // The replicas share `x-regcache` through a YAML merge key.
            let named = service["image"]
                .as_str()
                .or(service["<<"]["image"].as_str());
            assert_eq!(named, Some(image.as_str()), "compose {name}");
        }
    }
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for heavy in [
        "target",
        ".git",
        "loadtest/target",
        "deploy/validate/node_modules",
    ] {
        assert!(
            ignored.lines().any(|line| line == heavy),
            ".dockerignore lacks {heavy}"
        );
    }
}

/// The unit's `ExecStart`, split into words.
fn unit_exec_start() -> Vec<String> {
    let unit = std::fs::read_to_string(repo().join("deploy/regcache.service")).expect("unit");
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart");
    line.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_systemd_unit_serves_with_the_example_config_as_an_unprivileged_user_in_the_root() {
    let unit = std::fs::read_to_string(repo().join("deploy/regcache.service")).expect("unit");
    assert!(
        unit.lines().any(|l| l == "StateDirectory=regcache"),
        "{unit}"
    );
    assert!(
        !unit.lines().any(|l| l.starts_with("Environment=RUST_LOG")),
        "RUST_LOG in the unit overrides log.level"
    );
    if let Some(analyze) = common::find_on_path("systemd-analyze") {
        // The unit as installed, with this build's binary where it says /usr/local/bin.
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join("regcache.service");
        let text = unit.replace("/usr/local/bin/regcache", env!("CARGO_BIN_EXE_regcache"));
        std::fs::write(&copy, text).expect("unit copy");
        let verified = Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("run");
        assert!(
            verified.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }

    // What systemd would do: a state directory owned by the dynamic user, the config installed
    // as shipped, the unit's command line run as that user from `/`, handed its socket.
    let root = tempfile::tempdir().expect("temp dir");
    let state = root.path().join("state");
    let binary = root.path().join("regcache");
    let config = root.path().join("config.toml");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::copy(env!("CARGO_BIN_EXE_regcache"), &binary).expect("binary");
    std::fs::copy(repo().join("config.toml.example"), &config).expect("config");
    // The effective uid, second on the `Uid:` line.
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let as_root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    let wrapper: Vec<&str> = if as_root {
        use std::os::unix::fs::PermissionsExt as _;
        for path in [root.path(), state.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("mode");
        }
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown");
        vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        Vec::new()
    };
    let mut words = unit_exec_start().into_iter();
    assert_eq!(words.next().as_deref(), Some("/usr/local/bin/regcache"));
    let args: Vec<String> = words
        .map(|word| match word.as_str() {
            "/etc/regcache/config.toml" => config.display().to_string(),
            "/var/lib/regcache" => state.display().to_string(),
            _ => word,
        })
        .collect();
    let listener = common::proxy::bind_local();
    let address = common::proxy::local_addr(&listener);
    let mut child = common::proxy::activated(&wrapper, &binary, &[("http", &listener)])
        .args(&args)
        .current_dir("/")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the unit's command");
    let client = reqwest::Client::new();
    let readyz = client
        .get(format!("http://{address}/readyz"))
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await;
    let _ = child.start_kill();
    let output = child.wait_with_output().await.expect("exit");
    let status = readyz.map(|r| r.status().as_u16());
    assert_eq!(
        status.as_ref().ok(),
        Some(&200),
        "not ready: {status:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        state.join("blobs").is_dir() && state.join("index").is_dir(),
        "store not in the state directory"
    );
}
