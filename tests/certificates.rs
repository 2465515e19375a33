//! Domains with TLS where cert-manager's API exists: the chart's Certificates, one per TLS
//! domain, and the App's `CertificatesReady` following them. A test binary of its own: the
//! cert-manager CRDs (a fixture the project writes; the controller cannot be built here, so the
//! test marks Certificates Ready itself) change what every other test's cluster would serve.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase};
use support::agent::*;
use support::eventually;

fn certificates(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
            "certificates",
        ),
    )
}

async fn install_cert_manager_api(client: &Client) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cert-manager-crds.yaml");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for document in support::yaml_documents(&path) {
        let crd: CustomResourceDefinition = serde_json::from_value(document).unwrap();
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("certificates-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    eventually(
        TIMEOUT,
        "cert-manager.io/v1 Certificates to be served",
        || async {
            certificates(client, "default")
                .list(&ListParams::default())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

async fn certificates_ready(client: &Client, project: &str) -> Option<(String, String, String)> {
    let app = Api::<App>::namespaced(client.clone(), project)
        .get("shop")
        .await
        .unwrap();
    let condition = app
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CertificatesReady")?;
    Some((condition.status, condition.reason, condition.message))
}

#[tokio::test]
async fn tls_domains_get_certificates_from_the_issuer_and_the_app_reports_when_they_are_issued() {
    let env = env().await;
    install_cert_manager_api(&env.client).await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "certs").await;
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "image", "image": "registry.example.com/demo/shop:1.0"},
            "processes": {"web": {"port": 8080}},
            "domains": [{"host": "shop.example.com"}, {"host": "www.example.com"}, {"host": "plain.example.com", "tls": false}],
            "deploy": {"certificateIssuer": "letsencrypt-staging"},
        }}),
    )
    .await;
    wait_app(&env.client, &project, "shop", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "shop-1"}, "spec": {"appName": "shop"}}),
    )
    .await;
    wait_build(&env.client, &project, "shop-1", AppBuildPhase::Completed).await;

    // One Certificate per TLS domain, from the App's issuer, into the Secret its Ingress serves.
    let certs = certificates(&env.client, &project);
    let ingresses = Api::<Ingress>::namespaced(env.client.clone(), &project)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(ingresses.len(), 3);
    let mut names = Vec::new();
    for host in ["shop.example.com", "www.example.com"] {
        let name = shapeblock_agent::controllers::deploy::tls_secret_name("shop", host);
        let certificate = certs.get(&name).await.unwrap();
        let spec = &certificate.data["spec"];
        assert_eq!(spec["dnsNames"], json!([host]));
        assert_eq!(spec["secretName"], name.as_str());
        assert_eq!(
            spec["issuerRef"],
            json!({"name": "letsencrypt-staging", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        let ingress = ingresses
            .iter()
            .find(|i| {
                i.spec.as_ref().unwrap().rules.as_ref().unwrap()[0]
                    .host
                    .as_deref()
                    == Some(host)
            })
            .unwrap();
        let tls = ingress.spec.as_ref().unwrap().tls.clone().unwrap();
        assert_eq!(tls[0].secret_name.as_deref(), Some(name.as_str()));
        assert!(
            !ingress
                .annotations()
                .contains_key("cert-manager.io/cluster-issuer"),
            "one mechanism: no ingress-shim annotation beside the Certificate"
        );
        names.push(name);
    }
    assert_eq!(
        certs.list(&ListParams::default()).await.unwrap().items.len(),
        2,
        "none for the plain domain"
    );
    let (status, _, message) = eventually(TIMEOUT, "CertificatesReady=False/Issuing", || async {
        certificates_ready(&env.client, &project)
            .await
            .filter(|(_, reason, _)| reason == "Issuing")
    })
    .await
    .0;
    assert_eq!(status, "False");
    assert!(
        message.contains("shop.example.com") && message.contains("www.example.com"),
        "{message}"
    );

    // cert-manager (here: the test) issues them.
    for name in &names {
        certs
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}})),
            )
            .await
            .unwrap();
    }
    let (status, _, message) = eventually(
        Duration::from_secs(90),
        "CertificatesReady=True/Issued",
        || async {
            certificates_ready(&env.client, &project)
                .await
                .filter(|(_, reason, _)| reason == "Issued")
        },
    )
    .await
    .0;
    assert_eq!(status, "True");
    assert!(message.contains("shop.example.com"), "{message}");
    let app = Api::<App>::namespaced(env.client.clone(), &project)
        .get("shop")
        .await
        .unwrap();
    let domains: Vec<(String, bool, Option<bool>)> = app
        .status
        .unwrap()
        .domains
        .into_iter()
        .map(|d| (d.host, d.tls, d.certificate_ready))
        .collect();
    assert_eq!(
        domains,
        vec![
            ("shop.example.com".into(), true, Some(true)),
            ("www.example.com".into(), true, Some(true)),
            ("plain.example.com".into(), false, None),
        ]
    );
}
