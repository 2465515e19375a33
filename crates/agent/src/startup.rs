//! What the leader does once before its controllers start: bring the ShapeBlock CRDs up to this
//! binary's version, and find out whether the k3s helm-controller's HelmChart kind exists.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

use crate::names::FIELD_MANAGER;

/// Server-side applies the ShapeBlock CRDs (forcing ownership: this binary's schema wins).
///
/// Helm installs a chart's `crds/` once and never upgrades them, so without this an upgraded
/// agent would run against the previous release's schema.
pub async fn apply_crds(client: &kube::Client) -> Result<(), kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::chart::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    tracing::info!(count = crate::rbac::SHAPEBLOCK_CRDS.len(), "CRDs applied");
    Ok(())
}

/// Whether the apiserver serves `helm.cattle.io/v1` HelmCharts, which App deploys need.
pub async fn helm_chart_kind_served(client: &kube::Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources("helm.cattle.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "helmcharts")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(err),
    }
}

/// What to tell the operator when HelmCharts are not served.
pub const HELM_CONTROLLER_MISSING: &str = "the HelmChart kind (helm.cattle.io/v1) is not served: App deploys need the k3s helm-controller. \
     k3s and RKE2 ship it; elsewhere install the chart with --set helmController.install=true";
