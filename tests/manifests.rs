//! The container image and the Kubernetes examples in `docker/`: they parse, and the fields that
//! make a FUSE sidecar work are there (Docker and a cluster are not available to the tests; these
//! checks are what stands in for them).

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;

fn repo(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = repo(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--name` in `args` (`--name=value` or `--name value`).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            Some(v)
        } else if *a == long {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

fn has(args: &[String], name: &str) -> bool {
    let long = format!("--{name}");
    args.iter()
        .any(|a| *a == long || a.starts_with(&format!("{long}=")))
}

/// The pod template's spec of the one workload in `rel`, checked for what every bucketfs pod
/// needs; returns (pod spec, the sidecars' args).
fn check_pod(rel: &str, kind: &str) -> (Value, Vec<Vec<String>>) {
    let docs = yaml_docs(rel);
    let workload = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("{rel}: no {kind}"));
    let pod = workload["spec"]["template"]["spec"].clone();
    let init = pod["initContainers"].as_array().expect("initContainers");
    let apps = pod["containers"].as_array().expect("containers");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);

    let sidecars: Vec<&Value> = init
        .iter()
        .filter(|c| strs(&c["args"]).first().map(String::as_str) == Some("mount"))
        .collect();
    assert!(!sidecars.is_empty(), "{rel}: no bucketfs mount");
    let mut ports = Vec::new();
    let mut all_args = Vec::new();
    for c in &sidecars {
        let name = c["name"].as_str().unwrap();
        let args = strs(&c["args"]);
        let what = format!("{rel}: {name}");
        // The real command line parser accepts the arguments.
        let argv = std::iter::once("bucketfs".to_string()).chain(args.iter().cloned());
        if let Err(e) = bucketfs::cli::Cli::try_parse_from(argv) {
            panic!("{what}: bucketfs refuses its arguments: {e}");
        }
        // The container's process is the daemon: it serves in the foreground.
        assert!(has(&args, "foreground"), "{what}: no --foreground");
        // A native sidecar: started before the apps, stopped after them.
        assert_eq!(c["restartPolicy"], "Always", "{what}: not a native sidecar");
        // FUSE and Bidirectional propagation need a privileged container.
        assert_eq!(
            c["securityContext"]["privileged"], true,
            "{what}: not privileged"
        );
        // The mount point is a volume shared with propagation.
        let mountpoint = &args[2];
        let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
        let shared = mounts
            .iter()
            .find(|m| m["mountPath"] == mountpoint.as_str())
            .unwrap_or_else(|| panic!("{what}: {mountpoint} is not a volume"));
        assert_eq!(shared["mountPropagation"], "Bidirectional", "{what}");
        let volume = shared["name"].as_str().unwrap();
        let users: Vec<&Value> = apps
            .iter()
            .filter_map(|a| {
                a["volumeMounts"]
                    .as_array()?
                    .iter()
                    .find(|m| m["name"] == volume)
            })
            .collect();
        assert!(!users.is_empty(), "{what}: no app container uses {volume}");
        for m in users {
            assert_eq!(m["mountPropagation"], "HostToContainer", "{what}: {m}");
        }
        // Probes on the port bucketfs serves.
        let addr = flag(&args, "http-addr").unwrap_or_else(|| panic!("{what}: no --http-addr"));
        let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            !ports.contains(&port),
            "{rel}: port {port} used twice in one pod"
        );
        ports.push(port);
        assert!(
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["containerPort"] == port)
        );
        let startup = &c["startupProbe"]["httpGet"];
        assert_eq!(startup["path"], "/readyz", "{what}: startup probe");
        assert_eq!(startup["port"], port, "{what}: startup probe port");
        let liveness = &c["livenessProbe"]["httpGet"];
        assert_eq!(liveness["path"], "/healthz", "{what}: liveness probe");
        assert_eq!(liveness["port"], port, "{what}: liveness probe port");
        // The pod waits for the shutdown to finish.
        let timeout = flag(&args, "shutdown-timeout")
            .map(|t| bucketfs::config::parse_duration(t).unwrap())
            .unwrap_or(Duration::from_secs(20));
        assert!(
            timeout + bucketfs::mount::READER_GRACE <= Duration::from_secs(grace),
            "{what}: terminationGracePeriodSeconds {grace} is shorter than the shutdown"
        );
        // Mounts other users read need --allow-other when the apps run as another user.
        if apps
            .iter()
            .any(|a| a["securityContext"]["runAsUser"].is_u64())
        {
            assert!(has(&args, "allow-other"), "{what}: no --allow-other");
        }
        all_args.push(args);
    }
    for c in init.iter().chain(apps) {
        let limits = &c["resources"]["limits"];
        assert!(
            limits["memory"].is_string() && limits["cpu"].is_string(),
            "{rel}: {} has no cpu and memory limits",
            c["name"]
        );
    }
    (pod, all_args)
}

#[test]
fn the_inference_deployment_warms_a_node_cache_and_mounts_read_only() {
    let rel = "docker/k8s/inference-deployment.yaml";
    let (pod, sidecars) = check_pod(rel, "Deployment");
    let mount = &sidecars[0];
    assert!(has(mount, "read-only"));
    let cache_dir = flag(mount, "cache-dir").expect("a node cache");
    // The cache is a hostPath, shared by every pod on the node.
    let init = pod["initContainers"].as_array().unwrap();
    let sidecar = init
        .iter()
        .find(|c| c["restartPolicy"] == "Always")
        .unwrap();
    let cache_volume = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == cache_dir)
        .expect("the cache dir is a volume")["name"]
        .clone();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == cache_volume)
        .unwrap();
    assert!(volume["hostPath"]["path"].is_string(), "{volume}");
    // `bucketfs warm` fills the same cache, from the same source, as a step that completes.
    let warm = init
        .iter()
        .find(|c| strs(&c["args"]).first().map(String::as_str) == Some("warm"))
        .expect("a warm step");
    assert!(
        warm.get("restartPolicy").is_none(),
        "warm runs to completion"
    );
    let warm_args = strs(&warm["args"]);
    assert_eq!(warm_args[1], mount[1], "warms what is mounted");
    assert_eq!(flag(&warm_args, "cache-dir"), Some(cache_dir));
    let argv = std::iter::once("bucketfs".to_string()).chain(warm_args.iter().cloned());
    bucketfs::cli::Cli::try_parse_from(argv).expect("bucketfs accepts the warm step");
}

#[test]
fn the_training_job_reads_a_dataset_and_writes_checkpoints_with_locks() {
    let rel = "docker/k8s/training-job.yaml";
    let (pod, sidecars) = check_pod(rel, "Job");
    let dataset = sidecars
        .iter()
        .find(|a| a[1].starts_with("gs://") && has(a, "read-only"))
        .expect("a read-only GCS dataset mount");
    let ckpt = sidecars
        .iter()
        .find(|a| a[1].starts_with("gs://") && !has(a, "read-only"))
        .expect("a writable GCS checkpoint mount");
    assert_ne!(dataset[1], ckpt[1]);
    // Locks are on: not turned off, and the lock owner is named after the pod.
    assert!(!has(ckpt, "no-locks"), "locks are on");
    let init = pod["initContainers"].as_array().unwrap();
    let sidecar = init.iter().find(|c| strs(&c["args"]) == *ckpt).unwrap();
    let pod_name = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .expect("POD_NAME names the lock owner");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // The trainer writes there as the user that owns the files.
    let trainer = &pod["containers"][0];
    let uid = trainer["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_eq!(flag(ckpt, "uid"), Some(uid.to_string().as_str()));
    let ckpt_volume = sidecar["volumeMounts"][0]["name"].clone();
    let app_mount = trainer["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == ckpt_volume)
        .unwrap();
    assert_ne!(
        app_mount["readOnly"], true,
        "the trainer writes checkpoints"
    );
    // Native sidecars let the Job complete when the trainer exits.
    assert_eq!(pod["restartPolicy"], "Never");
}

#[test]
fn the_dockerfile_builds_like_the_scripts_and_runs_bucketfs() {
    let text = repo("docker/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage");
    const BUILD: &str = "cargo build --release --locked";
    assert!(lines.contains(&format!("RUN {BUILD}").as_str()), "{text}");
    // The command the image builds with is the one the project's scripts run.
    assert!(
        repo("scripts/demo.sh").lines().any(|l| l.trim() == BUILD),
        "scripts/demo.sh builds differently"
    );
    let runtime = &text[text.rfind("\nFROM ").unwrap()..];
    for pkg in ["fuse3", "ca-certificates"] {
        assert!(runtime.contains(pkg), "runtime stage lacks {pkg}");
    }
    assert!(runtime.contains("COPY --from=build /src/target/release/bucketfs"));
    assert!(lines.contains(&r#"ENTRYPOINT ["bucketfs"]"#), "{text}");
    // The endpoints are on in the container, and `mount` serves from the container's process.
    assert!(runtime.contains("BUCKETFS_HTTP_ADDR=0.0.0.0:9180"));
    assert!(runtime.contains("BUCKETFS_FOREGROUND=true"));
    // The build context leaves out the (large) build output.
    assert!(repo(".dockerignore").lines().any(|l| l.trim() == "target/"));
}
