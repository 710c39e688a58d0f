"""Attribute rules for DICOM VL Whole Slide Microscopy instances.

A keep-list design: an attribute survives only when a rule below says so. The actions follow
the PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1): UIDs are replaced
consistently (U), Type 2 attributes that must stay present are emptied (Z), Type 1 attributes
that must keep a value get a dummy or a keyed pseudonym (D), everything listed for removal
(X) is removed, and so is every attribute no rule knows (reported as unknown). Private
attributes are always removed. Dates and times are removed or blanked/dummied per the date
policy ("remove").
"""

from __future__ import annotations

import enum
import re
from typing import Any

from pydicom.datadict import tag_for_keyword


class Act(enum.Enum):
    KEEP = "keep"  # value unchanged
    SEQ = "seq"  # keep the sequence, clean every item recursively
    SEQ_EMPTY = "seq_empty"  # Type 2 sequence: keep it, without items (Z)
    UID = "uid"  # replace with a keyed, consistent UID (U)
    EMPTY = "empty"  # Type 2: keep, zero length (Z)
    DUMMY = "dummy"  # Type 1: non-empty dummy (D)
    REMOVE = "remove"  # X
    PSEUDO_PATIENT = "pseudo_patient"
    PATIENT_NAME = "patient_name"
    PSEUDO_CONTAINER = "pseudo_container"
    PSEUDO_SPECIMEN = "pseudo_specimen"
    PSEUDO_DEVICE = "pseudo_device"
    CONTENT = "content"  # a content-item sequence (specimen preparation steps etc.)
    SPECIMEN_PREPARATION = "specimen_preparation"  # per policy: SEQ_EMPTY or SEQ
    REPLACED = "replaced"  # removed from the input, set by the de-identifier itself
    CODE_MEANING = "code_meaning"  # regenerated from the code dictionary (never copied)


_KEEP = """
SpecificCharacterSet SOPClassUID InstanceNumber ContentQualification ImageType FrameType
Modality SeriesNumber AcquisitionNumber PatientOrientation PositionReferenceIndicator
Manufacturer ManufacturerModelName SoftwareVersions
SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit
PixelRepresentation PlanarConfiguration PixelAspectRatio SmallestImagePixelValue
LargestImagePixelValue PixelPaddingValue ICCProfile ColorSpace
RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor
BluePaletteColorLookupTableDescriptor RedPaletteColorLookupTableData
GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
SegmentedRedPaletteColorLookupTableData SegmentedGreenPaletteColorLookupTableData
SegmentedBluePaletteColorLookupTableData
NumberOfFrames FrameIncrementPointer RepresentativeFrameNumber InConcatenationNumber
InConcatenationTotalNumber ConcatenationFrameOffsetNumber
PixelSpacing SliceThickness SpacingBetweenSlices XOffsetInSlideCoordinateSystem
YOffsetInSlideCoordinateSystem ZOffsetInSlideCoordinateSystem
ColumnPositionInTotalImagePixelMatrix RowPositionInTotalImagePixelMatrix
OpticalPathIdentifier DimensionIndexValues FrameAcquisitionNumber StackID
InStackPositionNumber FrameAcquisitionDuration RescaleIntercept RescaleSlope RescaleType
WindowCenter WindowWidth VOILUTFunction ReferencedSOPClassUID ReferencedFrameNumber
DimensionIndexPointer FunctionalGroupPointer
DimensionOrganizationType
AcquisitionDuration VolumetricProperties ImagedVolumeWidth ImagedVolumeHeight
ImagedVolumeDepth TotalPixelMatrixColumns TotalPixelMatrixRows ImageOrientationSlide
SpecimenLabelInImage FocusMethod ExtendedDepthOfField NumberOfFocalPlanes
DistanceBetweenFocalPlanes RecommendedAbsentPixelCIELabValue BurnedInAnnotation
RecognizableVisualFeatures LossyImageCompression LossyImageCompressionRatio
LossyImageCompressionMethod PresentationLUTShape TotalPixelMatrixFocalPlanes
NumberOfOpticalPaths
IlluminationWaveLength LightPathFilterPassThroughWavelength
LightPathFilterPassBand ImagePathFilterPassThroughWavelength ImagePathFilterPassBand
ObjectiveLensPower ObjectiveLensNumericalAperture CondenserLensPower
CodeValue CodingSchemeDesignator CodingSchemeVersion LongCodeValue URNCodeValue
ContextIdentifier ContextUID MappingResource MappingResourceUID
ContextGroupExtensionFlag CodingSchemeUID
ValueType RelationshipType NumericValue FloatingPointValue
ExtendedOffsetTable ExtendedOffsetTableLengths
"""

_SEQ = """
SharedFunctionalGroupsSequence PerFrameFunctionalGroupsSequence PixelMeasuresSequence
PlanePositionSlideSequence OpticalPathIdentificationSequence
WholeSlideMicroscopyImageFrameTypeSequence FrameContentSequence
PixelValueTransformationSequence FrameVOILUTSequence ReferencedImageSequence
PurposeOfReferenceCodeSequence DerivationImageSequence SourceImageSequence
DerivationCodeSequence DimensionOrganizationSequence DimensionIndexSequence
ContainerTypeCodeSequence SpecimenDescriptionSequence SpecimenTypeCodeSequence
PrimaryAnatomicStructureSequence PrimaryAnatomicStructureModifierSequence
TotalPixelMatrixOriginSequence OpticalPathSequence IlluminationTypeCodeSequence
IlluminationColorCodeSequence IlluminatorTypeCodeSequence
LightPathFilterTypeStackCodeSequence ImagePathFilterTypeStackCodeSequence
LensesCodeSequence ChannelDescriptionCodeSequence PaletteColorLookupTableSequence
CodingSchemeIdentificationSequence ConceptNameCodeSequence ConceptCodeSequence
MeasuredValueSequence MeasurementUnitsCodeSequence NumericValueQualifierCodeSequence
EquivalentCodeSequence ReferencedSeriesSequence ReferencedInstanceSequence
StudiesContainingOtherReferencedInstancesSequence SpecimenReferenceSequence
ReferencedSOPSequence
"""

_UID = """
SOPInstanceUID StudyInstanceUID SeriesInstanceUID FrameOfReferenceUID
DimensionOrganizationUID SpecimenUID PyramidUID AcquisitionUID ConcatenationUID
SOPInstanceUIDOfConcatenationSource ReferencedSOPInstanceUID DeviceUID
PaletteColorLookupTableUID UID
"""

# Type 2 attributes of the WSM IOD that must remain present (Z)
_EMPTY = """
StudyDate StudyTime ReferringPhysicianName StudyID AccessionNumber PatientBirthDate
PatientSex
"""

# Type 1 dates/times of the WSM IOD (D): replaced by a fixed dummy
_DUMMY = """
ContentDate ContentTime AcquisitionDateTime FrameAcquisitionDateTime FrameReferenceDateTime
"""

_SEQ_EMPTY = """
IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
AcquisitionContextSequence
"""

_CONTENT = """
SpecimenPreparationStepContentItemSequence SpecimenLocalizationContentItemSequence
"""

# Listed by PS3.15 for removal (X, or X/Z/D where the WSM IOD does not need them); their
# values are remembered as identifying for verification.
_REMOVE = """
AcquisitionComments AcquisitionDate AcquisitionTime AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdditionalPatientHistory AdmissionID Allergies BarcodeValue
LabelText BranchOfService ContentCreatorName ContributingEquipmentSequence
ContributionDateTime ContributionDescription CountryOfResidence CurrentPatientLocation
DerivationDescription DeviceDescription EthnicGroup FrameComments IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
InstanceCreationDate InstanceCreationTime InstanceCreatorUID InstitutionAddress
InstitutionName InstitutionalDepartmentName InstitutionCodeSequence
InstitutionalDepartmentTypeCodeSequence IssuerOfAccessionNumberSequence IssuerOfPatientID
IssuerOfPatientIDQualifiersSequence MedicalAlerts MedicalRecordLocator MilitaryRank
ModifiedAttributesSequence NameOfPhysiciansReadingStudy Occupation
OperatorIdentificationSequence OperatorsName OriginalAttributesSequence OtherPatientIDs
OtherPatientIDsSequence OtherPatientNames PatientAddress PatientAge PatientBirthName
PatientBirthTime PatientComments PatientInsurancePlanCodeSequence PatientMotherBirthName
PatientReligiousPreference PatientSize PatientTelephoneNumbers PatientWeight
PatientSexNeutered PerformedProcedureStepDescription PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime
PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedLocation
PerformedStationAETitle PerformedStationName PerformingPhysicianName
PerformingPhysicianIdentificationSequence PersonAddress PersonTelephoneNumbers
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PregnancyStatus ProtocolName
PyramidDescription PyramidLabel ReasonForStudy ReferencedPatientSequence
ReferencedStudySequence ReferencedPerformedProcedureStepSequence ReferringPhysicianAddress
ReferringPhysicianTelephoneNumbers ReferringPhysicianIdentificationSequence
RequestAttributesSequence RequestedProcedureDescription RequestedProcedureID
RequestingPhysician RequestingService ResponsibleOrganization ResponsiblePerson SeriesDate
SeriesTime SeriesDescription SlideIdentifier SmokingStatus SpecimenAccessionNumber
SpecimenDetailedDescription SpecimenShortDescription StationName StudyComments
StudyDescription TimezoneOffsetFromUTC ContainerDescription ContainerComponentSequence
AlternateContainerIdentifierSequence ConsultingPhysicianName
AcquisitionDeviceProcessingDescription AcquisitionContextDescription StudyIDIssuer
ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName
ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSubjectID
ClinicalTrialSubjectReadingID ClinicalTrialTimePointID ClinicalTrialTimePointDescription
ClinicalTrialCoordinatingCenterName ReasonForTheRequestedProcedure OrderEnteredBy
OrderEntererLocation FillerOrderNumberImagingServiceRequest
PlacerOrderNumberImagingServiceRequest PatientState SpecialNeeds RetrieveAETitle
StationAETitle DigitalSignaturesSequence DataSetTrailingPadding WindowCenterWidthExplanation
TextValue DateTime Date Time PersonName PixelDataProviderURL
ContextGroupVersion ContextGroupLocalVersion
OpticalPathDescription DimensionDescriptionLabel MappingResourceName CodingSchemeName
CodingSchemeResponsibleOrganization CodingSchemeRegistry CodingSchemeExternalID
"""

_REPLACED = """
PatientIdentityRemoved DeidentificationMethod DeidentificationMethodCodeSequence
LongitudinalTemporalInformationModified
"""


def _tags(names: str) -> list[int]:
    out = []
    for kw in names.split():
        tag = tag_for_keyword(kw)
        if tag is None:
            raise RuntimeError(f"unknown DICOM keyword in rules: {kw}")
        out.append(int(tag))
    return out


RULES: dict[int, Act] = {}
for _names, _act in (
    (_KEEP, Act.KEEP),
    (_SEQ, Act.SEQ),
    (_UID, Act.UID),
    (_EMPTY, Act.EMPTY),
    (_DUMMY, Act.DUMMY),
    (_SEQ_EMPTY, Act.SEQ_EMPTY),
    (_CONTENT, Act.CONTENT),
    (_REMOVE, Act.REMOVE),
    (_REPLACED, Act.REPLACED),
):
    for _t in _tags(_names):
        if _t in RULES:
            raise RuntimeError(f"duplicate DICOM rule for {_t:08X}")
        RULES[_t] = _act
RULES[int(tag_for_keyword("PatientID") or 0)] = Act.PSEUDO_PATIENT
RULES[int(tag_for_keyword("PatientName") or 0)] = Act.PATIENT_NAME
RULES[int(tag_for_keyword("ContainerIdentifier") or 0)] = Act.PSEUDO_CONTAINER
RULES[int(tag_for_keyword("SpecimenIdentifier") or 0)] = Act.PSEUDO_SPECIMEN
RULES[int(tag_for_keyword("DeviceSerialNumber") or 0)] = Act.PSEUDO_DEVICE
RULES[int(tag_for_keyword("SpecimenPreparationSequence") or 0)] = Act.SPECIMEN_PREPARATION
RULES[int(tag_for_keyword("CodeMeaning") or 0)] = Act.CODE_MEANING

# --- controlled values of the kept text attributes --------------------------------------------
# A kept attribute of a text VR must match its pattern here, value by value; anything else
# rejects the instance (UNEXPECTED_DICOM_VALUE, naming the attribute only). Free text
# (descriptions, labels, names) is never kept: those attributes are on the removal list above,
# and Code Meaning is regenerated from the code dictionary.
# Manufacturer / ManufacturerModelName / SoftwareVersions name the device type and software,
# not the device (PS3.15 keeps them; the serial number is pseudonymised); they are held to the
# same short "device text" grammar as TIFF Make/Model, and removed when outside it.
_IMAGE_TYPE_VALUES = (
    r"ORIGINAL|DERIVED",
    r"PRIMARY|SECONDARY",
    r"VOLUME|THUMBNAIL|LABEL|OVERVIEW|LOCALIZER|REGIONLOCALIZER",
    r"NONE|RESAMPLED",
)


def _one_of(*values: str) -> re.Pattern[str]:
    return re.compile("^(?:" + "|".join(re.escape(v) for v in values) + ")$")


VOCABULARY: dict[str, re.Pattern[str]] = {
    "SpecificCharacterSet": re.compile(r"^(?:ISO_IR \d{1,3}|ISO 2022 IR \d{1,3}|GB18030|GBK|)$"),
    "ContentQualification": _one_of("PRODUCT", "RESEARCH", "SERVICE"),
    "Modality": _one_of("SM"),
    "PatientOrientation": re.compile(r"^[LRAPHF]{0,3}$"),
    "PositionReferenceIndicator": _one_of("SLIDE_CORNER", "SLIDE_LABEL", "UNKNOWN", ""),
    "PhotometricInterpretation": _one_of(
        "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
        "YBR_ICT", "YBR_RCT", "PALETTE COLOR",
    ),
    "ColorSpace": re.compile(r"^(?:SRGB|ADOBERGB|ROMMRGB|)$"),
    "OpticalPathIdentifier": re.compile(r"^\d{1,16}$"),
    "StackID": re.compile(r"^\d{1,16}$"),
    "RescaleType": _one_of("US", "OD", "HU", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT", ""),
    "VOILUTFunction": _one_of("LINEAR", "LINEAR_EXACT", "SIGMOID"),
    "DimensionOrganizationType": _one_of("TILED_FULL", "TILED_SPARSE", "3D", "3D_TEMPORAL"),
    "VolumetricProperties": _one_of(
        "VOLUME", "SAMPLED", "PROJECTION", "MAXIMUM", "MIXED", "DISTORTED"
    ),
    "SpecimenLabelInImage": _one_of("YES", "NO"),
    "ExtendedDepthOfField": _one_of("YES", "NO"),
    "BurnedInAnnotation": _one_of("YES", "NO"),
    "RecognizableVisualFeatures": _one_of("YES", "NO"),
    "FocusMethod": _one_of("AUTO", "MANUAL"),
    "LossyImageCompression": _one_of("00", "01"),
    "LossyImageCompressionMethod": _one_of(
        "ISO_10918_1", "ISO_14495_1", "ISO_15444_1", "ISO_15444_15", "ISO_13818_2",
        "ISO_14496_10", "ISO_23008_2", "ISO_18181_1",
    ),
    "PresentationLUTShape": _one_of("IDENTITY", "INVERSE"),
    "CodeValue": re.compile(r"^[A-Za-z0-9._\-:]{1,16}$"),
    "CodingSchemeDesignator": re.compile(r"^[A-Za-z0-9._\-:]{1,16}$"),
    "CodingSchemeVersion": re.compile(r"^[A-Za-z0-9._\-:]{0,16}$"),
    "LongCodeValue": re.compile(r"^[A-Za-z0-9._\-:]{1,64}$"),
    "URNCodeValue": re.compile(r"^(?:urn|http|https):[A-Za-z0-9._\-:/#?=]{1,200}$"),
    "ContextIdentifier": re.compile(r"^\d{1,8}$"),
    "MappingResource": re.compile(r"^[A-Z0-9_]{1,16}$"),
    "ContextGroupExtensionFlag": _one_of("Y", "N"),
    "ValueType": _one_of(
        "TEXT", "CODE", "NUMERIC", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE",
        "IMAGE", "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD", "CONTAINER", "TABLE",
    ),
    "RelationshipType": _one_of(
        "CONTAINS", "HAS PROPERTIES", "HAS OBS CONTEXT", "HAS ACQ CONTEXT", "INFERRED FROM",
        "SELECTED FROM", "HAS CONCEPT MOD",
    ),
}  # fmt: skip
# per-position vocabularies of the multi-valued type attributes (no values past the 4th)
POSITIONAL_VOCABULARY: dict[str, tuple[re.Pattern[str], ...]] = {
    "ImageType": tuple(re.compile(f"^(?:{v})$") for v in _IMAGE_TYPE_VALUES),
    "FrameType": tuple(re.compile(f"^(?:{v})$") for v in _IMAGE_TYPE_VALUES),
}
DEVICE_TEXT = frozenset({"Manufacturer", "ManufacturerModelName", "SoftwareVersions"})
# Type 2 attributes emptied (Z) when their value is outside the vocabulary
EMPTY_WHEN_UNKNOWN = frozenset({"PositionReferenceIndicator"})
DEVICE_TEXT_PATTERN = re.compile(r"^[A-Za-z0-9 ._\-()/+,:?]{0,64}$")
FREE_TEXT_VRS = frozenset({"LO", "ST", "LT", "UT", "SH", "PN", "CS", "UC", "UR", "AE"})


def value_allowed(keyword: str, values: list[str]) -> bool:
    """True when every value of a kept text attribute is in its controlled vocabulary."""
    positional = POSITIONAL_VOCABULARY.get(keyword)
    if positional is not None:
        return len(values) <= len(positional) and all(
            p.match(v) for p, v in zip(positional, values, strict=False)
        )
    if keyword in DEVICE_TEXT:
        return all(DEVICE_TEXT_PATTERN.match(v) for v in values)
    pattern = VOCABULARY.get(keyword)
    return pattern is not None and all(pattern.match(v) for v in values)


def _code_meanings() -> dict[tuple[str, str], str]:
    from pydicom.sr import _concepts_dict

    out: dict[tuple[str, str], str] = {}
    concepts: dict[str, dict[str, Any]] = _concepts_dict.concepts
    for scheme, by_name in concepts.items():
        for codes in by_name.values():
            for value, entry in dict(codes).items():
                out[(str(scheme), str(value))] = str(entry[0])
    # legacy SNOMED-RT (SRT) codes still written by WSI converters
    out.update(
        {
            ("SRT", "R-102C0"): "Full Spectrum",
            ("SRT", "A-0101B"): "Microscope slide",
            ("SRT", "T-28000"): "Lung",
            ("SRT", "R-40B1F"): "Paraffin wax",
        }
    )
    return out


CODE_MEANINGS: dict[tuple[str, str], str] = _code_meanings()


def canonical_code_meaning(value: str, scheme: str, given: str) -> str:
    """Code Meaning for (value, scheme) taken from the code dictionary, never from the input:
    the given text is kept only when it is the dictionary meaning or a word-aligned prefix of
    it ("Lung" for "Lung structure (body structure)"); unknown codes get the code value."""
    canonical = CODE_MEANINGS.get((scheme, value))
    if canonical is None:
        return value or "unknown"
    g, c = given.strip().casefold(), canonical.casefold()
    if g and c.startswith(g) and (len(g) == len(c) or not c[len(g)].isalnum()):
        return given.strip()  # the dictionary text (or its head), up to letter case
    return canonical


# The attributes the verifier accepts in an output dataset (besides REPLACED ones).
OUTPUT_ALLOWED: frozenset[int] = frozenset(t for t, a in RULES.items() if a not in (Act.REMOVE,))
# Content-item attributes that 'filter' mode may keep inside content sequences.
CONTENT_ITEM_TEXT = int(tag_for_keyword("TextValue") or 0)
CONTENT_ITEM_UID = int(tag_for_keyword("UID") or 0)

# Coded concepts of TEXT content items that carry specimen identifiers (DCM).
SPECIMEN_ID_CONCEPTS = frozenset({("121041", "DCM"), ("111705", "DCM")})
IDENTIFYING_CONCEPTS = SPECIMEN_ID_CONCEPTS | {("111724", "DCM"), ("111706", "DCM")}

DUMMY_BY_VR: dict[str, str] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
}
DATE_VRS = frozenset({"DA", "DT", "TM"})
TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)
MAX_LENGTH_BY_VR: dict[str, int] = {"LO": 64, "SH": 16, "PN": 64, "UI": 64, "CS": 16}

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
IMPLEMENTATION_VERSION_NAME = "TESSERA_DEID_1"
