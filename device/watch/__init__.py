"""The watch service (ctpi watch): intake, reading, storage and the journal, the daemon loop; imports device.core, device.config and device.cli."""
