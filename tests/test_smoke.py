"""The shortest path through a volume's life: if this fails, read nothing else first."""

from pathlib import Path

from driver.proto import csi_pb2


def test_volume_life_on_a_real_loop_device(plugin):
    volume = plugin.create("smoke", size=64 << 20)
    assert volume.capacity_bytes == 64 << 20
    target = plugin.stage_and_publish(volume, "smoke")
    Path(target, "hello").write_text("polyvol")
    plugin.unpublish_and_unstage(volume.volume_id, "smoke")
    assert not Path(target).exists()
    target = plugin.stage_and_publish(volume, "smoke")
    assert Path(target, "hello").read_text() == "polyvol"
    plugin.unpublish_and_unstage(volume.volume_id, "smoke")
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert not any((plugin.state_dir / "local" / "volumes").iterdir())
