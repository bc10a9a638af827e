"""Reading and writing images: DICOM studies, NIfTI/NRRD volumes, the PACS (DICOMweb) client, the phantom."""
