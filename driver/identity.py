"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from . import __version__
from .proto import csi_pb2, csi_pb2_grpc
from .rpc import method

Service = csi_pb2.PluginCapability.Service


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, serves_controller: bool, readiness):
        self.driver_name = driver_name
        self.serves_controller = serves_controller
        self.readiness = readiness  # callable returning (ready, reason)

    @method
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    @method
    def GetPluginCapabilities(self, request, context):
        services = [Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self.serves_controller:
            services.insert(0, Service.CONTROLLER_SERVICE)
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=Service(type=s)) for s in services])

    @method
    def Probe(self, request, context):
        ready, _ = self.readiness()
        return csi_pb2.ProbeResponse(ready={"value": ready})
