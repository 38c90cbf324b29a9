//! deploy/kubernetes/ is kept in step with deploy/docker/compose.yaml: the same roles under
//! the same names (so the same server.toml works in both), ports, variables, commands and
//! files, selectors that pick exactly their pods, and clients reachable only from servers.
//! (The schema of each manifest is checked in CI by `kubernetes-validate`, see .ci/run.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/docker/compose.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// Every document of every deploy/kubernetes/*.yaml, by (kind, name).
fn manifests() -> BTreeMap<(String, String), Value> {
    let mut all = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap();
            let kind = str_at(&value, &["kind"]).to_owned();
            let name = str_at(&value, &["metadata", "name"]).to_owned();
            if kind != "Namespace" {
                assert_eq!(
                    str_at(&value, &["metadata", "namespace"]),
                    "jobrelay",
                    "{kind}/{name} outside the namespace"
                );
            }
            let key = (kind.clone(), name.clone());
            assert!(
                all.insert(key, value).is_none(),
                "{kind}/{name} defined twice"
            );
        }
    }
    all
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    let mut value = value;
    for key in path {
        value = value
            .get(*key)
            .unwrap_or_else(|| panic!("no {path:?} in {value:?}"));
    }
    value
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// True if every label of `selector` is in `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The `KEY: value` environment of a compose service (none given: empty).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    service.get("environment").map(labels).unwrap_or_default()
}

/// The container's `env` as a map.
fn container_env(container: &Value) -> BTreeMap<String, String> {
    let Some(env) = container.get("env") else {
        return BTreeMap::new();
    };
    env.as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                str_at(e, &["name"]).to_owned(),
                str_at(e, &["value"]).to_owned(),
            )
        })
        .collect()
}

/// Compose's `volume:path[:ro]` entries as (source, target).
fn compose_mounts(service: &Value) -> BTreeMap<String, String> {
    strings(at(service, &["volumes"]))
        .into_iter()
        .map(|v| {
            let mut parts = v.split(':');
            let source = parts.next().unwrap().to_owned();
            let target = parts.next().unwrap().to_owned();
            (target, source)
        })
        .collect()
}

/// The non-comment lines of a TOML text, trimmed.
fn toml_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The compose services that run jobrelay (not the one-shot init, not the load balancer, not
/// the database).
fn roles(compose: &Value) -> Vec<(String, Value)> {
    at(compose, &["services"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
        .filter(|(name, _)| !["init", "lb", "db"].contains(&name.as_str()))
        .collect()
}

/// A compose client that joins its server (`--connect`) rather than being pushed to.
fn dials_out(service: &Value) -> bool {
    strings(at(service, &["command"]))
        .iter()
        .any(|a| a == "--connect")
}

#[test]
fn every_compose_role_has_a_deployment_and_service_of_the_same_name_ports_env_and_files() {
    let compose = compose();
    let manifests = manifests();
    let deployments: Vec<&Value> = manifests
        .iter()
        .filter(|((kind, _), _)| kind == "Deployment")
        .map(|(_, v)| v)
        .collect();
    let roles = roles(&compose);
    assert!(
        roles
            .iter()
            .filter(|(n, _)| n.starts_with("server"))
            .count()
            >= 2,
        "several servers on one database"
    );
    assert!(roles.iter().any(|(n, _)| n.starts_with("client")));
    assert!(
        roles.iter().any(|(_, s)| dials_out(s)),
        "a client that dials out"
    );
    assert_eq!(
        deployments.len(),
        roles.len(),
        "a Deployment per compose role, no more"
    );
    for (name, service) in &roles {
        let deployment = manifests
            .get(&("Deployment".into(), name.clone()))
            .unwrap_or_else(|| panic!("no Deployment {name}"));
        let pod = at(deployment, &["spec", "template"]);
        let pod_labels = labels(at(pod, &["metadata", "labels"]));
        let selector = labels(at(deployment, &["spec", "selector", "matchLabels"]));
        assert!(
            selects(&selector, &pod_labels),
            "{name}: selector misses its pods"
        );
        // The selector picks this Deployment's pods only.
        for other in &deployments {
            if str_at(other, &["metadata", "name"]) != name {
                let theirs = labels(at(other, &["spec", "template", "metadata", "labels"]));
                assert!(!selects(&selector, &theirs), "{name}: selector too wide");
            }
        }
        let component = if name.starts_with("server") {
            "server"
        } else {
            "client"
        };
        assert_eq!(pod_labels["app.kubernetes.io/component"], component);

        let containers = at(pod, &["spec", "containers"]).as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let container = &containers[0];
        // Same command (the image's entrypoint takes the role), same image by default.
        assert_eq!(
            strings(at(container, &["args"])),
            strings(at(service, &["command"])),
            "{name}: command"
        );
        let image = str_at(&compose, &["x-image", "image"]);
        assert!(
            image.ends_with(&format!(":-{}}}", str_at(container, &["image"]))),
            "{name}: image {image} vs {}",
            str_at(container, &["image"])
        );
        assert_eq!(
            compose_env(service),
            container_env(container),
            "{name}: env"
        );
        // A client that dials out listens on no port: nothing to probe, no Service.
        let port: Option<u64> = compose_env(service).get("PORT").map(|p| p.parse().unwrap());
        assert_eq!(port.is_none(), dials_out(service), "{name}: PORT");
        if let Some(port) = port {
            let ports = at(container, &["ports"]).as_sequence().unwrap();
            assert_eq!(ports.len(), 1);
            assert_eq!(at(&ports[0], &["containerPort"]).as_u64(), Some(port));
            for probe in ["readinessProbe", "livenessProbe"] {
                assert_eq!(
                    str_at(container, &[probe, "httpGet", "path"]),
                    "/health",
                    "{name}"
                );
            }
        } else {
            assert!(container.get("ports").is_none(), "{name} declares ports");
        }
        // Stop grace: as long as compose's.
        let grace = str_at(service, &["stop_grace_period"]);
        assert_eq!(
            format!(
                "{}s",
                at(pod, &["spec", "terminationGracePeriodSeconds"])
                    .as_u64()
                    .unwrap()
            ),
            grace,
            "{name}: grace"
        );
        assert_eq!(
            at(pod, &["spec", "securityContext", "runAsUser"]).as_u64(),
            Some(10001),
            "{name}: the image's user"
        );

        // The same files at the same paths: data volume → PVC, tokens → the Secret, the
        // server's config → the ConfigMap.
        let volumes: BTreeMap<String, Value> = at(pod, &["spec", "volumes"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| (str_at(v, &["name"]).to_owned(), v.clone()))
            .collect();
        let mounts: BTreeMap<String, Value> = at(container, &["volumeMounts"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| (str_at(m, &["mountPath"]).to_owned(), m.clone()))
            .collect();
        let compose_mounts = compose_mounts(service);
        assert_eq!(
            compose_mounts.len(),
            mounts.len(),
            "{name}: mounts {compose_mounts:?}"
        );
        for (target, source) in &compose_mounts {
            let (path, file) = if source.starts_with("./") {
                // A file bind-mounted in compose: its directory from a ConfigMap.
                let path = Path::new(target);
                (
                    path.parent().unwrap().to_str().unwrap().to_owned(),
                    Some(path.file_name().unwrap().to_str().unwrap().to_owned()),
                )
            } else {
                (target.clone(), None)
            };
            let mount = mounts
                .get(&path)
                .unwrap_or_else(|| panic!("{name}: nothing mounted at {path}"));
            let volume = &volumes[str_at(mount, &["name"])];
            if let Some(file) = file {
                let map = str_at(volume, &["configMap", "name"]);
                let config = &manifests[&("ConfigMap".into(), map.to_owned())];
                let ours = str_at(config, &["data", &file]);
                let theirs =
                    std::fs::read_to_string(repo().join("deploy/docker").join(source)).unwrap();
                assert_eq!(toml_lines(ours), toml_lines(&theirs), "{name}: {file}");
            } else if source == "tokens" {
                let secret = str_at(volume, &["secret", "secretName"]);
                assert_eq!(secret, "tokens");
                assert!(manifests.contains_key(&("Secret".into(), secret.to_owned())));
                let mode = at(volume, &["secret", "defaultMode"]).as_u64().unwrap();
                assert_eq!(mode & 0o007, 0, "{name}: tokens readable by others");
            } else {
                let claim = str_at(volume, &["persistentVolumeClaim", "claimName"]);
                assert_eq!(claim, source, "{name}: data volume");
                assert!(
                    manifests.contains_key(&("PersistentVolumeClaim".into(), claim.to_owned())),
                    "no PVC {claim}"
                );
                assert!(
                    at(&compose, &["volumes"]).get(source.as_str()).is_some(),
                    "compose does not declare {source}"
                );
            }
            assert_eq!(
                mount
                    .get("readOnly")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                strings(at(service, &["volumes"]))
                    .iter()
                    .any(|v| v.ends_with(&format!("{target}:ro"))),
                "{name}: read-only at {target}"
            );
        }

        // The Service of the same name, so `http://client-1:9000` resolves in both; none for
        // a client that dials out.
        let Some(port) = port else {
            assert!(
                !manifests.contains_key(&("Service".into(), name.clone())),
                "a Service for {name}, which dials out"
            );
            continue;
        };
        let service_k8s = manifests
            .get(&("Service".into(), name.clone()))
            .unwrap_or_else(|| panic!("no Service {name}"));
        let selector = labels(at(service_k8s, &["spec", "selector"]));
        assert!(
            selects(&selector, &pod_labels),
            "Service {name} misses its pods"
        );
        for other in &deployments {
            if str_at(other, &["metadata", "name"]) != name {
                let theirs = labels(at(other, &["spec", "template", "metadata", "labels"]));
                assert!(!selects(&selector, &theirs), "Service {name} too wide");
            }
        }
        let ports = at(service_k8s, &["spec", "ports"]).as_sequence().unwrap();
        assert_eq!(at(&ports[0], &["port"]).as_u64(), Some(port));
    }
    // The secret holds what compose's init step writes.
    let init = std::fs::read_to_string(repo().join("deploy/docker/init-tokens.sh")).unwrap();
    let secret = &manifests[&("Secret".into(), "tokens".into())];
    for key in at(secret, &["stringData"]).as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            init.contains(&format!("$dir/{key}\"")),
            "init writes no {key}"
        );
    }
}

#[test]
fn the_api_service_selects_every_server_on_the_load_balancers_port() {
    let compose = compose();
    let manifests = manifests();
    let lb = &manifests[&("Service".into(), "lb".into())];
    let selector = labels(at(lb, &["spec", "selector"]));
    let published = strings(at(&compose, &["services", "lb", "ports"]));
    let container_port: u64 = published[0].rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        at(&at(lb, &["spec", "ports"])[0], &["port"]).as_u64(),
        Some(container_port)
    );
    for ((kind, name), value) in &manifests {
        if kind == "Deployment" {
            let pod_labels = labels(at(value, &["spec", "template", "metadata", "labels"]));
            assert_eq!(
                selects(&selector, &pod_labels),
                name.starts_with("server"),
                "lb and {name}"
            );
        }
    }
    // Compose's load balancer lists every server of the compose file.
    let haproxy = std::fs::read_to_string(repo().join("deploy/docker/haproxy.cfg")).unwrap();
    for (name, _) in roles(&compose) {
        if name.starts_with("server") {
            assert!(
                haproxy.contains(&format!("server {name} {name}:5000")),
                "haproxy.cfg lacks {name}"
            );
        }
    }
}

#[test]
fn clients_are_reachable_only_from_servers() {
    let compose = compose();
    // Compose: clients only on the internal network, only the load balancer publishes ports.
    assert_eq!(
        at(&compose, &["networks", "back", "internal"]).as_bool(),
        Some(true)
    );
    // A client that dials out: on a network of its own (internal) that only the load
    // balancer shares, and it goes through the load balancer.
    assert_eq!(
        at(&compose, &["networks", "pull", "internal"]).as_bool(),
        Some(true)
    );
    let services = at(&compose, &["services"]).as_mapping().unwrap();
    for (name, service) in roles(&compose) {
        let networks = strings(at(&service, &["networks"]));
        if name.starts_with("client") && dials_out(&service) {
            assert_eq!(networks, ["pull"], "{name}");
            let command = strings(at(&service, &["command"]));
            let at_connect = command.iter().position(|a| a == "--connect").unwrap();
            assert_eq!(command[at_connect + 1], "http://lb:5000", "{name}");
        } else if name.starts_with("client") {
            assert_eq!(networks, ["back"], "{name}");
        }
        assert!(service.get("ports").is_none(), "{name} publishes a port");
    }
    for (other, service) in services {
        let on_pull = service
            .get("networks")
            .is_some_and(|n| strings(n).iter().any(|n| n == "pull"));
        let other = other.as_str().unwrap();
        if on_pull && other != "lb" {
            assert!(
                dials_out(service),
                "{other} shares the network of the client that dials out"
            );
        }
    }
    // Kubernetes: a policy on every client pod letting in only server pods, on the client port.
    let manifests = manifests();
    let policies: Vec<&Value> = manifests
        .iter()
        .filter(|((kind, _), _)| kind == "NetworkPolicy")
        .map(|(_, v)| v)
        .collect();
    for ((kind, name), deployment) in &manifests {
        if kind != "Deployment" {
            continue;
        }
        let pod_labels = labels(at(deployment, &["spec", "template", "metadata", "labels"]));
        if pod_labels["app.kubernetes.io/component"] != "client" {
            continue;
        }
        // Every policy that selects the pod (Kubernetes lets in what any of them allows).
        let selecting: Vec<&&Value> = policies
            .iter()
            .filter(|p| {
                selects(
                    &labels(at(p, &["spec", "podSelector", "matchLabels"])),
                    &pod_labels,
                )
            })
            .collect();
        assert!(!selecting.is_empty(), "no NetworkPolicy selects {name}");
        let pulls = strings(
            at(deployment, &["spec", "template", "spec", "containers"])[0]
                .get("args")
                .unwrap(),
        )
        .iter()
        .any(|a| a == "--connect");
        for policy in selecting {
            assert_eq!(strings(at(policy, &["spec", "policyTypes"])), ["Ingress"]);
            let rules = at(policy, &["spec", "ingress"]).as_sequence().unwrap();
            if pulls {
                assert!(rules.is_empty(), "{name} dials out: it needs no ingress");
            }
            for rule in rules {
                for from in at(rule, &["from"]).as_sequence().unwrap() {
                    let peer = labels(at(from, &["podSelector", "matchLabels"]));
                    assert_eq!(
                        peer.get("app.kubernetes.io/component").map(String::as_str),
                        Some("server"),
                        "{name} reachable from {peer:?}"
                    );
                    assert!(
                        from.get("ipBlock").is_none() && from.get("namespaceSelector").is_none()
                    );
                }
                let port = compose_env(at(&compose, &["services", name]))["PORT"].clone();
                let ports = at(rule, &["ports"]).as_sequence().unwrap();
                assert!(ports.iter().all(
                    |p| at(p, &["port"]).as_u64().map(|p| p.to_string()) == Some(port.clone())
                ));
            }
        }
    }
}

#[test]
fn the_database_is_the_same_in_both_and_reachable_from_servers_only() {
    let compose = compose();
    let manifests = manifests();
    let db = at(&compose, &["services", "db"]);
    let set = &manifests[&("StatefulSet".into(), "db".into())];
    let pod = at(set, &["spec", "template"]);
    let container = &at(pod, &["spec", "containers"]).as_sequence().unwrap()[0];
    // Same image, environment, port and files.
    let image = str_at(db, &["image"]);
    assert!(
        image.ends_with(&format!(":-{}}}", str_at(container, &["image"]))),
        "db: image {image} vs {}",
        str_at(container, &["image"])
    );
    assert_eq!(compose_env(db), container_env(container), "db: env");
    let ports = at(container, &["ports"]).as_sequence().unwrap();
    assert_eq!(at(&ports[0], &["containerPort"]).as_u64(), Some(5432));
    let service = &manifests[&("Service".into(), "db".into())];
    assert!(selects(
        &labels(at(service, &["spec", "selector"])),
        &labels(at(pod, &["metadata", "labels"]))
    ));
    let mounts: Vec<String> = at(container, &["volumeMounts"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| str_at(m, &["mountPath"]).to_owned())
        .collect();
    let compose_mounts: Vec<String> = compose_mounts(db).into_keys().collect();
    assert_eq!(
        mounts.iter().collect::<std::collections::BTreeSet<_>>(),
        compose_mounts.iter().collect(),
        "db: mounts"
    );
    // Every server reaches it under the same name, with the same password file.
    for (name, server) in roles(&compose) {
        if name.starts_with("server") {
            let env = compose_env(&server);
            assert_eq!(env["JOBRELAY_DB_HOST"], "db", "{name}");
            assert_eq!(
                env["JOBRELAY_DB_PASSWORD_FILE"],
                compose_env(db)["JOBRELAY_DB_PASSWORD_FILE"],
                "{name}"
            );
            assert!(strings(at(&server, &["networks"])).contains(&"data".to_owned()));
        } else {
            assert!(
                !strings(at(&server, &["networks"])).contains(&"data".to_owned()),
                "{name} reaches the database"
            );
        }
    }
    // Compose: the database only on the internal network `data`, no port published.
    assert_eq!(strings(at(db, &["networks"])), ["data"]);
    assert!(db.get("ports").is_none());
    assert_eq!(
        at(&compose, &["networks", "data", "internal"]).as_bool(),
        Some(true)
    );
    // Kubernetes: a policy on the database pod letting in server pods only, on 5432.
    let policy = manifests
        .iter()
        .filter(|((kind, _), _)| kind == "NetworkPolicy")
        .map(|(_, v)| v)
        .find(|p| {
            selects(
                &labels(at(p, &["spec", "podSelector", "matchLabels"])),
                &labels(at(pod, &["metadata", "labels"])),
            )
        })
        .expect("a NetworkPolicy on the database pod");
    let rules = at(policy, &["spec", "ingress"]).as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    let from = at(&rules[0], &["from"]).as_sequence().unwrap();
    assert_eq!(
        labels(at(&from[0], &["podSelector", "matchLabels"]))["app.kubernetes.io/component"],
        "server"
    );
    assert_eq!(
        at(&at(&rules[0], &["ports"])[0], &["port"]).as_u64(),
        Some(5432)
    );
    // The password is in the Secret the init step fills.
    let secret = &manifests[&("Secret".into(), "tokens".into())];
    assert!(at(secret, &["stringData"]).get("db.password").is_some());
}
