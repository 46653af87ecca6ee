#!/usr/bin/env bash
# Build the Flex Template image + spec, then launch a run on Dataflow.
# Usage: PROJECT=p REGION=r BUCKET=b bash deploy/dataflow/build_and_launch.sh \
#          gs://b/manifest.csv gs://b/softmix-out [extra template parameters...]
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/softmix/softmix:0.1.0}"
SPEC="gs://${BUCKET}/templates/softmix.json"
manifest="$1"; out="$2"; shift 2

gcloud builds submit --project "$PROJECT" --tag "$IMAGE" -f deploy/dataflow/Dockerfile .
gcloud dataflow flex-template build "$SPEC" --project "$PROJECT" \
  --image "$IMAGE" --sdk-language PYTHON --metadata-file deploy/dataflow/metadata.json

params="manifest=${manifest},out=${out}"
for extra in "$@"; do params="${params},${extra}"; done
gcloud dataflow flex-template run "softmix-$(date +%Y%m%d-%H%M%S)" --project "$PROJECT" \
  --region "$REGION" --template-file-gcs-location "$SPEC" \
  --parameters "${params},sdk_container_image=${IMAGE}" \
  --temp-location "gs://${BUCKET}/tmp"
