"""The DICOM node (ctpi dicom): receive (Storage SCP), the ledger, results and sending them back; imports device.core, device.watch, device.config and device.cli."""
