// Validates the ServiceMonitor given as JSON (argv[2]) against the prometheus-operator schema
// that @kubernetes-models/prometheus-operator bundles. Exit status 1 with the error on stderr
// when it does not validate. Run by tests/deploy.rs.
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const resource = JSON.parse(process.argv[2]);
try {
  new ServiceMonitor(resource).validate();
} catch (error) {
  console.error(String(error?.message ?? error));
  process.exit(1);
}
